# phi3ops: `make run` trains on the embedded defaults, `make test` runs the suite.
# Every target installs what it needs into .venv first (idempotent: reinstalls only when
# pyproject.toml changes).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
PIPELINE ?= pipelines/tiny-cpu.yaml
# The CPU build of torch. On a CUDA machine: make run TORCH_SPEC='torch==2.13.0' from the CUDA index.
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)

# The default path never downloads; set HF_HUB_OFFLINE=0 for the real model from the hub.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

PREFECT_PORT ?= 4200

.PHONY: install lock phi3-tokenizer run test test-fast ui prefect-server stop schedule lint clean \
	deploy worker \
	gpu-wheels \
	smoke-full-size

# The environment comes from requirements.lock (every package pinned), so a retrain months from
# now runs on the same packages; `make lock` writes it anew from a fresh install of pyproject's
# ranges. torch first and pinned: a range would pull a multi-GB CUDA build on a CPU machine.
# Everything pinned: no resolving (--no-deps). Bytecode: pip would compile each package's files
# one at a time, so it is told not to, and compileall then compiles all of site-packages on every
# core. Compiled once here, because with PYTHONDONTWRITEBYTECODE=1 (CI, many Docker images)
# Python writes no .pyc on import: every process would compile torch and transformers again,
# about 8 s each (bench/startup.py). A few files written for a newer Python never import here.
PY_NEWER_ONLY := py312|_312
$(STAMP): pyproject.toml requirements.lock
	@echo "installing into $(VENV) from requirements.lock (about 90 s, bytecode compiling included)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q --no-compile "$(TORCH_SPEC)"
	@$(BIN)/python -m pip install -q --no-compile --no-deps -r requirements.lock
	@$(BIN)/python -m pip install -q --no-deps -e '.[dev]'
	@$(BIN)/python -m pip check
	@$(BIN)/python -m compileall -q -j 0 -x '$(PY_NEWER_ONLY)' \
		"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
	@rm -f $(VENV)/.installed-* && touch $@
	@echo "installed: $$($(BIN)/python -m pip list --format=freeze | wc -l) packages"

install: $(STAMP)

lock:  ## requirements.lock from a fresh venv with pyproject's ranges (dev extras included)
	rm -rf .cache/lock-venv && $(PYTHON) -m venv .cache/lock-venv
	.cache/lock-venv/bin/python -m pip install -q --upgrade pip
	.cache/lock-venv/bin/python -m pip install -q "$(TORCH_SPEC)"
	.cache/lock-venv/bin/python -m pip install -q -e '.[dev]'
	( echo "# make lock: every package of a fresh '.[dev]' install, pinned (torch without its"; \
	  echo "# local build label: the Makefile installs torch first, from TORCH_SPEC)."; \
	  .cache/lock-venv/bin/python -m pip freeze --exclude-editable | sed 's/+[a-z0-9.]*$$//' \
	) > requirements.lock
	rm -rf .cache/lock-venv

# Phi-3's real tokenizer, from llama.cpp's vocabulary in llama-cpp-python's sdist (pinned sha256,
# checked against its reference vectors); built once into .cache/models, the archive kept in
# ~/.cache/phi3ops. Offline: set PHI3OPS_LLAMA_CPP_SDIST to a downloaded copy.
phi3-tokenizer: install  ## build (once) and verify Phi-3's real tokenizer
	$(BIN)/python -m phi3ops.model.phi3_tokenizer .cache/models

run: install phi3-tokenizer  ## the whole retrain flow on $(PIPELINE)
	$(BIN)/phi3ops run --pipeline $(PIPELINE)

# Two workers, one file each at a time (pytest-xdist): on 2 cores the suite takes about 30% less
# time than one process, since much of it waits on servers and subprocesses. Each worker's torch
# gets its share of the cores (tests/conftest.py). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test: install  ## every test, slow end-to-end ones included (what CI runs)
	$(PYTEST)

test-fast: install  ## unit tests only
	$(PYTEST) -m "not slow"

ui: install  ## MLflow UI over the local tracking store on http://127.0.0.1:5000
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlruns.db \
		--default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000

# A persistent local Prefect server (SQLite under ~/.prefect): `phi3ops run` finds it on
# 127.0.0.1:$(PREFECT_PORT), so runs and their artifacts stay in its UI. `make stop` ends it.
prefect-server: install  ## local Prefect server on http://127.0.0.1:$(PREFECT_PORT), in the background
	@curl -sf http://127.0.0.1:$(PREFECT_PORT)/api/health >/dev/null || \
		( mkdir -p .cache && $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) \
			> .cache/prefect-server.log 2>&1 & echo $$! > .cache/prefect-server.pid; \
		  until curl -sf http://127.0.0.1:$(PREFECT_PORT)/api/health >/dev/null; do sleep 1; done )
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT) (make stop ends it)"

stop:  ## stop the Prefect server that `make prefect-server` or `make schedule` started
	@test -f .cache/prefect-server.pid && kill $$(cat .cache/prefect-server.pid) 2>/dev/null; \
		rm -f .cache/prefect-server.pid; echo "Prefect server stopped"

schedule: prefect-server  ## local Prefect server (SQLite) + the retrain deployment on its cron
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/python -m flows.schedule \
		--pipeline $(PIPELINE)

# The deployments of prefect.yaml on a Prefect server (PREFECT_API_URL, by default the one of
# `make prefect-server`), run by the workers of the process pool phi3ops-process: `make worker`
# on each machine that trains. The pool is created once; a deploy again updates the deployments.
deploy: install  ## prefect.yaml's deployments on the Prefect server, into the pool phi3ops-process
	export PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api}; \
	$(BIN)/prefect work-pool inspect phi3ops-process >/dev/null 2>&1 || \
		$(BIN)/prefect work-pool create phi3ops-process --type process && \
	$(BIN)/prefect --no-prompt deploy --all

worker: install  ## a process worker: runs the flow runs of phi3ops-process on this machine
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api} \
		$(BIN)/prefect worker start --pool phi3ops-process

lint: install
	$(BIN)/ruff check src flows tests bench

# bench/gpu_phi3_mini.py on the lent H200 (CPython 3.12, no package index there): the wheels its
# image lacks travel in .whl/; bench/gpu-requirements.txt lists them. Pure-Python wheels
# (py3-none-any) come whatever the platform.
GPU_WHEELS := .whl
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64

gpu-wheels:  ## the wheels for bench/gpu_phi3_mini.py on the H200, into .whl/ (one version each)
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(addprefix --platform ,$(GPU_PLATFORMS)) \
		-d $(GPU_WHEELS) -r bench/gpu-requirements.txt
	@du -ch $(GPU_WHEELS)/*.whl | tail -1

smoke-full-size: phi3-tokenizer  ## full-size Phi-3-mini, random weights, on CPU: 2 LoRA steps + merge
	$(BIN)/python bench/full_size_smoke.py

clean:  ## generated outputs (not the venv, not the DVC remote)
	rm -rf .cache runs mlruns.db mlartifacts
