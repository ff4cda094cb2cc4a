#!/usr/bin/env bash
# ON THE DEVICE MACHINE (H100/H200), after benchmarks/device/prepare.sh PROFILE here: installs the carried
# wheels, then runs the profile's benchmarks; every log also lands in $OUT.
#   clip-train: CLIP ViT-L/14 embedding stage (model only vs end to end from Parquet) and the SD-1.5-size
#               UNet training step at 256 and 512 px, bf16, torch.compile, pixel loss on and off (MFU)
#   ocr:        CRAFT detection at 512 px (model only) and the ocr scorer end to end
set -uo pipefail
PROFILE=${1:?usage: run.sh clip-train|ocr}
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
  *) echo "unknown profile $PROFILE" >&2; exit 2 ;;
esac
