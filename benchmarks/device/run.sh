#!/usr/bin/env bash
# ON THE DEVICE MACHINE (H100/H200), after benchmarks/device/prepare.sh PROFILE here: installs the carried
# wheels, then runs the profile's benchmarks; every log also lands in $OUT.
#   clip-train: CLIP ViT-L/14 embedding stage (model only vs end to end from Parquet) and the SD-1.5-size
#               UNet training step at 256 and 512 px, bf16, torch.compile, pixel loss on and off (MFU)
#   ocr:        CRAFT detection at 512 px (model only) and the ocr scorer end to end
#   public-bases: quality-tuning step of the public bases (issue 11; RANDOM weights at the real shapes):
#               SD-1.5 full fine-tune at 512 px and SDXL LoRA r16 at 1024 px, batch 8, bf16, pixel loss off
#               and on: eager (a row that runs out of memory is rerun with checkpointing), eager with gradient
#               checkpointing, then torch.compile'd (rows print as they finish; ~540 s in all at most)
set -uo pipefail
PROFILE=${1:?usage: run.sh clip-train|ocr|public-bases|preference}
OUT=${OUT:-/tmp/needles-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
case "$PROFILE" in
  clip-train)
    timeout 150 python3 benchmarks/gpu_clip_ocr.py --device cuda --n 8192 --only clip 2>&1 | tee "$OUT/clip.log"
    timeout 360 python3 benchmarks/bench_train.py --resolution 256 512 --batch 64 --compile 2>&1 | tee "$OUT/train.log"
    ;;
  ocr)
    python3 - <<'PY' || exit 1
from pathlib import Path

import torch

out = Path("/tmp/easyocr-weights")
out.mkdir(exist_ok=True)
for name in ("craft_mlt_25k.pth", "english_g2.pth"):
    state = torch.load(f".device/weights/{name}.fp16", map_location="cpu", weights_only=True)
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, out / name)
PY
    timeout 240 python3 benchmarks/gpu_clip_ocr.py --device cuda --n 8192 --only ocr --ocr-model-dir /tmp/easyocr-weights --restored-weights 2>&1 | tee "$OUT/ocr.log"
    ;;
  public-bases)
    python3 -c "import diffusers, peft, pydantic; print('diffusers', diffusers.__version__, 'peft', peft.__version__, 'pydantic', pydantic.__version__)" | tee -a "$OUT/gpu.txt"
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # fewer fragmentation OOMs across the rows
    B=benchmarks/bench_public_bases.py
    timeout 150 python3 $B 2>&1 | tee "$OUT/public_bases.log"
    timeout 110 python3 $B --grad-checkpointing 2>&1 | tee "$OUT/public_bases_ckpt.log"
    # compiled; SDXL with checkpointing, as the public-lora preset trains (batch 8 at 1024 px is likely over
    # memory without it: ~16 GiB of saved activations a sample, estimated; an OOM would compile it twice)
    timeout 100 python3 $B --compile --cases sd15-full 2>&1 | tee "$OUT/public_bases_compile.log"
    timeout 150 python3 $B --compile --cases sdxl-lora --grad-checkpointing 2>&1 | tee -a "$OUT/public_bases_compile.log"
    ;;
  preference)
    # issue 15: SFT vs Diffusion-DPO vs SimPO steps, without and with the pixel term (mu=2), SD-1.5-size UNet
    # with RANDOM weights, 512 px, 8 pairs (16 images), bf16: pairs/s, images/s, peak memory per row
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    timeout 150 python3 benchmarks/bench_preference.py --resolution 512 --pairs 8 2>&1 | tee "$OUT/preference.log"
    timeout 100 python3 benchmarks/bench_preference.py --resolution 512 --pairs 8 --grad-checkpointing 2>&1 | tee "$OUT/preference_ckpt.log"
    ;;
  *) echo "unknown profile $PROFILE" >&2; exit 2 ;;
esac
