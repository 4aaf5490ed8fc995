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

PREFECT_PORT ?= 4200

.PHONY: install run test test-fast ui schedule lint clean

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

schedule: install  ## local Prefect server (SQLite) + the retrain deployment on its cron
	@curl -sf http://127.0.0.1:$(PREFECT_PORT)/api/health >/dev/null || \
		( mkdir -p .cache && $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) \
			> .cache/prefect-server.log 2>&1 & \
		  until curl -sf http://127.0.0.1:$(PREFECT_PORT)/api/health >/dev/null; do sleep 1; done )
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/python flows/schedule.py \
		--pipeline $(PIPELINE)

lint: install
	$(BIN)/ruff check src flows tests bench

clean:  ## generated outputs (not the venv, not the DVC remote)
	rm -rf .cache runs mlruns.db mlartifacts
