# deeplab-ray: `make demo` runs the whole loop on embedded defaults, `make test` runs the tests.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# torch/torchvision first and pinned (constraints.txt). PyPI's Linux torch wheels are CUDA builds
# (they run on CPU too): the venv is ~6.8 GB, 3.2 GB of it the nvidia/ CUDA libraries; PyPI has no
# CPU-only Linux wheel of this torch.
# constraints.txt pins the rest to versions known to resolve together (mlflow 3.17.x; boto3/botocore
# in the range aiobotocore accepts, else pip backtracks for a long time).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/python -m pipelines.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/models.py --output docs/benchmarks.md
	$(BIN)/python bench/data_pipeline.py --ray --output docs/benchmarks.md
	$(BIN)/python bench/train_throughput.py --output docs/benchmarks.md
	$(BIN)/python bench/segment_throughput.py --output docs/benchmarks.md

clean:
	rm -rf data outputs mlflow.db mlartifacts ray_results .pytest_cache

# Offline wheels for the lent GPU machine (CPython 3.12, no package index): docs/operations.md.
# WHEELHOUSE_TIER=gpu (default; fits the 64 MiB carry) or full.
.PHONY: wheelhouse
wheelhouse:
	bash infra/wheelhouse.sh $(WHEELHOUSE_TIER)

# The GPU suite (bench/gpu_suite.py): GPU-path checks, training MFU, batch-segmentation rates,
# written to docs/benchmarks.md "## GPU suite". Needs a CUDA device; uses .venv where there is one,
# else $(PYTHON) (on the lent GPU machine: make gpu-suite PYTHON=python3.12). CPU dry run:
# python bench/gpu_suite.py --device cpu --dry-run
.PHONY: gpu-suite
gpu-suite:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) bench/gpu_suite.py --output docs/benchmarks.md

# Serve a registered model over HTTP: MLflow's scoring server, POST /invocations with
# {"inputs": <uint8 N x H x W x 3 RGB>} -> {"predictions": <N x H x W class ids>} (the pyfunc:
# single scale, no CRF). The venv's bin goes first on PATH: `mlflow models serve` starts
# `uvicorn` by name, and without it on PATH exits 127 ("uvicorn: not found").
#   make serve MODEL=models:/deeplab@champion TRACKING_URI=sqlite:///$(PWD)/mlflow.db PORT=5001
MODEL ?= models:/deeplab@champion
TRACKING_URI ?= sqlite:///$(abspath mlflow.db)
HOST ?= 127.0.0.1
PORT ?= 5001
.PHONY: serve
serve: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI="$(TRACKING_URI)" \
		$(abspath $(BIN))/mlflow models serve -m "$(MODEL)" --env-manager local --host $(HOST) --port $(PORT)
