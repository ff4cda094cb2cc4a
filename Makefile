# needles: `make demo` runs the whole job on the embedded sample; `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PREFECT := $(VENV)/bin/prefect
DATA ?= data
CONFIG ?=
# tiny on a CPU machine, the SD-1.5-size preset where torch sees a GPU
PRESET ?= $(shell $(PY) -c "import torch; print('sd15' if torch.cuda.is_available() else 'tiny')" 2>/dev/null || echo tiny)
# the newest curated set the curate flow exported (override: make train-qt CURATED=path);
# SET="key=value ..." overrides preset fields (python -m model train-qt --help)
# BASE=folder-or-hub-id: quality-tune a public SD 1.x/2.x or SDXL base (PRESET=public-full or public-lora)
# GPUS=n: data-parallel training, one process per GPU (torchrun; on a machine without CUDA the processes
# use the CPU over gloo)
GPUS ?= 1
TRAIN_LAUNCH = $(if $(filter 1,$(GPUS)),$(PY),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(GPUS))
CURATED ?= $(shell $(PY) -c "from pathlib import Path; from flows.train import latest_curated; print(latest_curated(Path('$(DATA)')))" 2>/dev/null)

export RAY_USAGE_STATS_ENABLED := 0
export PREFECT_API_URL ?= http://127.0.0.1:4200/api

DEMO_PARAMS := {"sources": ["$(DATA)/sample"], "run_dir": "$(DATA)/runs/demo", "config": "configs/demo.yaml", \
  "generalist_target": 60, "specialist_target": 20, "annotator_mode": "simulated", "train": true, "preset": "tiny", \
  "train_overrides": ["autoencoder.train_steps=30", "pretrain.0.max_steps=10", "pretrain.1.max_steps=5", "quality_tune.max_steps=15"]}

.PHONY: install test demo up down sample pipeline-demo weights config labelstudio-install labelstudio labelstudio-stop train-qt train-pref eval experiment clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# constraints.txt pins every package (transitive ones too) to the versions CI tests with
	$(VENV)/bin/pip install -c constraints.txt -e '.[dev]'
	touch $@

# Label Studio's server lives in its own venv (its python-json-logger pin conflicts with prefect's).
labelstudio-install:
	annotation/labelstudio/install.sh

labelstudio: labelstudio-install
	annotation/labelstudio/start.sh

labelstudio-stop:
	annotation/labelstudio/stop.sh

test: install labelstudio-install
	$(PY) -m pytest

# The local stack: Prefect server + the process serving the deployments + the round relay + Label Studio.
up: install labelstudio-install
	$(PY) -m flows up

down:
	$(PY) -m flows down

sample: install
	@test -f $(DATA)/sample/captions.jsonl || $(PY) -m pipeline sample $(DATA)/sample

# The whole DAG on the embedded sample: tiny models, simulated annotators, tiny training run.
demo: up sample
	$(PY) -m flows run curate/quality-set --params '$(DEMO_PARAMS)'
	$(PY) -m flows where

# Only the automatic pipeline (no servers): ingest, score, select, report.
pipeline-demo: sample
	$(PY) -m pipeline run $(DATA)/sample --run $(DATA)/runs/pipeline-demo $(if $(CONFIG),--config $(CONFIG))

train-qt: install
	@test -n "$(CURATED)" || { echo "no curated set under $(DATA)/: run 'make demo' or pass CURATED=path"; exit 2; }
	$(TRAIN_LAUNCH) -m model train-qt --preset $(PRESET) --data $(CURATED) --out $(DATA)/train-qt-$(PRESET) $(foreach s,$(SET),--set $(s)) $(if $(filter command line environment,$(origin BASE)),--base $(BASE))

# Preference tuning (Diffusion-DPO / SimPO with the pixel-space term): `make train-pref CHECKPOINT=pipeline
# PAIRS=pairs.parquet` (pairs from `python -m annotation pref-export`, an A/B round, or an automatic judge);
# SET="preference.objective=simpo preference.pixel_loss_weight=2 preference.feedback=[ai]" overrides the config;
# GPUS=8 runs it data-parallel (torchrun), as train-qt
train-pref: install
	@test -n "$(CHECKPOINT)" -a -n "$(PAIRS)" || { echo "give CHECKPOINT=pipeline-folder PAIRS=pairs.parquet"; exit 2; }
	$(TRAIN_LAUNCH) -m model train-pref --checkpoint $(CHECKPOINT) --pairs $(PAIRS) --out $(DATA)/train-pref $(foreach s,$(SET),--set $(s)) $(if $(filter command line environment,$(origin PRESET)),--preset $(PRESET))

# Did quality-tuning help? `make eval BASE=pipeline TUNED=pipeline`: generations of both on the same prompts and
# seeds, the automatic judges, then human A/B rounds in Label Studio (the run suspends until people have voted;
# ANNOTATORS=simulated for scripted demo voters). Without BASE/TUNED: the demo's checkpoints, simulated voters.
# KID/FD against the newest curated set (CURATED=path to choose another reference).
ifeq ($(origin BASE),undefined)
ANNOTATORS ?= simulated
else
ANNOTATORS ?= people
endif
BASE ?= $(shell $(PY) -c "from flows.evaluate import latest_checkpoints; print(latest_checkpoints()[0])" 2>/dev/null)
TUNED ?= $(shell $(PY) -c "from flows.evaluate import latest_checkpoints; print(latest_checkpoints()[1])" 2>/dev/null)
EVAL_RUN ?= $(DATA)/runs/eval
EVAL_ARGS ?= $(if $(filter simulated,$(ANNOTATORS)),--n-prompts 12 --seeds 2 --steps 8,) $(if $(CURATED),--reference $(CURATED))
eval: up
	@test -n "$(BASE)" -a -n "$(TUNED)" || { echo "no checkpoints: pass BASE=pipeline TUNED=pipeline, or run 'make demo' first"; exit 2; }
	$(PY) -m flows evaluate --base $(BASE) --tuned $(TUNED) --run-dir $(EVAL_RUN) --annotators $(ANNOTATORS) $(EVAL_ARGS)

weights: install
	$(PY) -m pipeline weights $(if $(CONFIG),--config $(CONFIG))
	$(PY) -m model weights $(if $(PRESET),--preset $(PRESET)) $(if $(filter command line environment,$(origin BASE)),--base $(BASE))

# The small-scale quality-tuning experiment (issue 14) on a synthetic haystack of known quality: CPU version
# (64 px, small counts; <= 15 min on 2 cores). KID needs the evaluation stage's ImageNet features (make weights);
# without them the report says KID was skipped. EXPERIMENT_PROFILE=smoke for a 1-minute run.
EXPERIMENT_PROFILE ?= cpu
experiment: install
	$(PY) -m experiment run --out $(DATA)/experiment-$(EXPERIMENT_PROFILE) --profile $(EXPERIMENT_PROFILE)

# Regenerate the documented default config from pipeline/config.py (a test keeps them equal).
config: install
	$(PY) -m pipeline.config > configs/pipeline.yaml

clean:
	rm -rf $(DATA)/runs $(DATA)/train-qt-* .run
