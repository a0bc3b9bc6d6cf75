# Two commands a newcomer needs (see README.md):
#   make test   - create .venv (torch 2.13.0 CPU first, then this project) and run the test suite
#   make train  - the main job on the embedded default: demo shards + tiny LLM (built if missing),
#                 2 CPU ranks under deepspeed on ds_configs/zero2.json, MLflow store in runs/demo
#   make demo   - build the demo shards under shards/demo and summarise them
#   make bench  - the CPU benchmarks (docs/benchmarks.md)
#   make mlflow-ui - browse the runs of a local MLflow store (default: the demo's) at http://127.0.0.1:5000
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint train demo mlflow-ui bench bench-loader clean

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check egmf launch tests bench

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

train: $(STAMP)
	$(BIN)/deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json

demo: $(STAMP)
	$(BIN)/python -m egmf.shards demo --out shards/demo
	$(BIN)/python -m egmf.shards inspect shards/demo

# One worker and no job runner: about 0.5 GB instead of 2.6 GB. Training can log to it over HTTP too
# (--mlflow.tracking_uri=http://127.0.0.1:5000); artifacts then go to MLFLOW_ARTIFACTS through the server.
MLFLOW_STORE ?= runs/demo/mlflow.db
MLFLOW_ARTIFACTS ?= runs/mlflow-artifacts
MLFLOW_PORT ?= 5000
mlflow-ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri sqlite:///$(abspath $(MLFLOW_STORE)) \
		--artifacts-destination $(abspath $(MLFLOW_ARTIFACTS)) --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

bench-loader: $(STAMP)
	$(BIN)/python bench/loader.py

# The CPU benchmarks, each printing its table (figures: docs/benchmarks.md); bench/gpu_step.py needs a GPU.
bench: bench-loader
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/padding.py
	$(BIN)/python bench/fusion_cost.py

clean:
	rm -rf $(VENV) shards/demo runs/demo runs/tiny-llm .pytest_cache
