# needles: `make demo` runs the whole job on the embedded sample; `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= data
RUN ?= $(DATA)/runs/demo
CONFIG ?=
# tiny on a CPU machine, the SD-1.5-size preset where torch sees a GPU
PRESET ?= $(shell $(PY) -c "import torch; print('sd15' if torch.cuda.is_available() else 'tiny')" 2>/dev/null || echo tiny)

export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install test demo sample pipeline report weights labelstudio-install labelstudio labelstudio-stop train-qt clean

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

sample: install
	$(PY) -m pipeline sample $(DATA)/sample

demo: sample
	$(PY) -m pipeline run $(DATA)/sample --run $(RUN) $(if $(CONFIG),--config $(CONFIG))
	@echo "report: $(RUN)/report/index.html"

weights: install
	$(PY) -m pipeline weights $(if $(CONFIG),--config $(CONFIG))

clean:
	rm -rf $(DATA)/runs .run
