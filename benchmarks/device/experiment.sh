#!/usr/bin/env bash
# The GPU version of the small-scale quality-tuning experiment (issue 14): profile `gpu` of experiment/run.py
# (128 px, 50K haystack, QT on 100 / 1K / 2K curated, 3 replicates), as device calls of <= 10 min each.
# NOT YET RUN ON A DEVICE: no device was lent to the session that wrote it; the per-call sizes are estimates.
# Its fresh-machine path was rehearsed on the CPU with the smoke profile: from the three JSON files alone,
# `--step haystack --step data --step train --step generate --step judge --replicate 0` rebuilt the same
# haystack and training folders and judged replicate 0 (59 s), and the report was built from its tarball.
#
#   HERE (pip reaches PyPI; the CPU part: haystack, pipeline, simulated rounds, the training sets' lists):
#     benchmarks/device/experiment.sh prepare        # ~1 h on 2 busy cores (rendering 50K images at 128 px)
#   ON THE DEVICE, one call per replicate R = 0, 1, 2 (each regenerates the haystack, which is deterministic,
#   rebuilds the training folders from data.json, then trains, generates and judges replicate R):
#     run(command="bash benchmarks/device/experiment.sh device R", carry=[".device"], timeout_s=600)
#   HERE, after each call, unpack what came back, then build the report once all replicates are in:
#     benchmarks/device/experiment.sh collect FILES_AT   # FILES_AT: the folder the run tool put $OUT's files in
#     .venv/bin/python -m experiment run --out data/experiment-gpu --profile gpu --step report
#
# A call that runs out of time leaves nothing half-done behind: each step writes its outputs before the
# next starts (experiment/run.py), and the results tarball is written only at the end; rerun the same R.
# What travels (< 64 MiB): the wheels the GPU image lacks (pydantic, diffusers), MobileNetV2's ImageNet
# weights for KID (14 MB), and the experiment's light state (profile/curation/data JSON: file lists only).
set -euo pipefail
MODE=${1:?usage: experiment.sh prepare | device R | collect FILES_AT}
cd "$(dirname "$0")/../.."
RUN=data/experiment-gpu
STATE=.device/experiment
case "$MODE" in
  prepare)
    .venv/bin/python -m experiment run --out "$RUN" --profile gpu --step haystack --step curate --step data
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
    rm -rf .device && mkdir -p .device/wheels "$STATE" .device/torch/hub/checkpoints
    pin() { grep -i "^$1==" constraints.txt | head -1; }
    SPECS=()
    for p in pydantic pydantic_core annotated-types typing-inspection typing_extensions diffusers importlib_metadata; do
      spec=$(pin "$p" || pin "${p//_/-}" || true)
      [ -n "$spec" ] || spec="$p==$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")"
      SPECS+=("$spec")
    done
    PLATFORMS=()
    for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" --platform manylinux2014_x86_64 --platform any -d .device/wheels "${SPECS[@]}"
    # KID's features: the file `make weights` stages (or ../shared's copy)
    WEIGHTS=$(.venv/bin/python -c "from pipeline.weights import torch_home; print(torch_home())")/hub/checkpoints/mobilenet_v2-b0353104.pth
    [ -f "$WEIGHTS" ] || WEIGHTS=../shared/weights/imagenet/mobilenet_v2-b0353104.pth
    if [ -f "$WEIGHTS" ]; then cp "$WEIGHTS" .device/torch/hub/checkpoints/; else echo "warning: no MobileNetV2 weights: KID will be skipped" >&2; fi
    cp "$RUN"/profile.json "$RUN"/curation.json "$RUN"/data.json "$STATE"/
    du -sh .device
    ;;
  device)
    R=${2:?usage: experiment.sh device REPLICATE}
    OUT=${OUT:-/tmp/needles-out}
    mkdir -p "$OUT" "$RUN"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/wheels/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCH_HOME=$PWD/.device/torch
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
    cp "$STATE"/*.json "$RUN"/
    # haystack (16 processes) -> training folders from data.json -> replicate R: autoencoder, pre-training,
    # the six QT arms, generation, judges; the curation step is skipped (curation.json came along)
    timeout 560 python3 -m experiment run --out "$RUN" --profile gpu --threads 0 --replicate "$R" \
      --step haystack --step data --step train --step generate --step judge 2>&1 | tee "$OUT/experiment-$R.log"
    # the results (judgements, generations, the arms' reports) and the autoencoder (a few MB: the report's ceiling); no UNets
    tar -czf "$OUT/replicate-$R.tar.gz" -C "$RUN" timings.json "models/seed-$R/checkpoints.json" \
      "models/seed-$R/judges.json" "models/seed-$R/judges.parquet" "models/seed-$R/generate" "models/seed-$R/autoencoder" \
      $(cd "$RUN" && ls -d models/seed-"$R"/arms/*/report.json models/seed-"$R"/pretrain/*/report.json 2>/dev/null)
    ;;
  collect)
    FILES=${2:?usage: experiment.sh collect FILES_AT}
    for t in "$FILES"/replicate-*.tar.gz; do tar -xzf "$t" -C "$RUN"; done
    ls "$RUN"/models
    ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac
