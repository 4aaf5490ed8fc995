# phi3ops: `make run` trains on the embedded defaults, `make test` runs the suite.
# Every target installs what it needs into .venv first (idempotent: reinstalls only when
# pyproject.toml changes).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
PIPELINE ?= pipelines/tiny-cpu.yaml
# The CPU build of torch. On a CUDA machine: make run TORCH_SPEC='torch==2.13.0' from the CUDA index.
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

# The default path never downloads; set HF_HUB_OFFLINE=0 for the real model from the hub.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1

.PHONY: install run test test-fast ui lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a range would pull a multi-GB CUDA build on a CPU machine
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

run: install  ## the whole retrain flow on $(PIPELINE)
	$(BIN)/phi3ops run --pipeline $(PIPELINE)

test: install  ## every test, slow end-to-end ones included (what CI runs)
	$(BIN)/python -m pytest

test-fast: install  ## unit tests only
	$(BIN)/python -m pytest -m "not slow"

ui: install  ## MLflow UI over the local tracking store on http://127.0.0.1:5000
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlruns.db \
		--default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000

lint: install
	$(BIN)/ruff check src flows tests bench

clean:  ## generated outputs (not the venv, not the DVC remote)
	rm -rf .cache runs mlruns.db mlartifacts
