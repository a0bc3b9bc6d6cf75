# Two commands a newcomer needs (see README.md):
#   make test      - create .venv (torch 2.13.0 CPU first, then this project) and run every test tier
#   make train     - the main job, the two-phase demo: demo shards + tiny LLM (built if missing), 2 CPU ranks under
#                    deepspeed on ds_configs/zero2.json; runs/demo-first, then runs/demo-phased (its MLflow store)
#   make test-fast - the fast tier (no slow/cluster/browser/gpu tests), about 2 minutes with a ready venv
#   make sweep     - the demo trained with 3 seeds (egmf-sweep) and its mean ± std table (egmf-report), in runs/demo-sweep
#   make demo      - build the demo shards under shards/demo and summarise them
#   make bench     - the CPU benchmarks (docs/benchmarks.md)
#   make gpu-check - everything measured on a GPU, in one run (bench/gpu_check.py; docs/benchmarks.md)
#   make mlflow-ui - browse the runs of a local MLflow store (default: the demo's) at http://127.0.0.1:5000
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FAST_TIER := not slow and not cluster and not browser and not gpu

.PHONY: test test-fast lint train sweep demo mlflow-ui bench bench-loader gpu-check gpu-wheels clean

test: $(STAMP) lint
	$(BIN)/python -m pytest -q --durations=20

test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "$(FAST_TIER)"

lint: $(STAMP)
	$(BIN)/ruff check egmf launch tests bench

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build. The rest is pinned to
# the tested set (.ci/constraints.txt); pyproject.toml keeps the supported ranges.
$(STAMP): pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c .ci/constraints.txt -e '.[dev]'
	touch $@

# Two phases (launch/recipes/demo-first.toml, then demo-phased.toml from its model): in the demo mix from the
# start the global expert never learns the look-up set, so it learns it alone first (docs/model.md).
train: $(STAMP)
	$(BIN)/deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json --config launch/recipes/demo-first.toml
	$(BIN)/deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json --config launch/recipes/demo-phased.toml

# A shorter schedule than `make train` (one process per seed, 1000 steps, constrained decoding) so that three
# seeds and the report fit in about a quarter of an hour on 2 cores.
SWEEP_SEEDS ?= 1,2,3
sweep: $(STAMP)
	$(BIN)/egmf-sweep --seeds $(SWEEP_SEEDS) --train.output_dir=runs/demo-sweep --train.steps=1000 \
		--eval.every=250 --checkpoint.every=0 --eval.modes="['constrained']" --mlflow.system_metrics=false

demo: $(STAMP)
	$(BIN)/python -m egmf.shards demo --out shards/demo
	$(BIN)/python -m egmf.shards inspect shards/demo

# One worker and no job runner: about 0.5 GB instead of 2.6 GB. Training can log to it over HTTP too
# (--mlflow.tracking_uri=http://127.0.0.1:5000); artifacts then go to MLFLOW_ARTIFACTS through the server.
MLFLOW_STORE ?= runs/demo-phased/mlflow.db
MLFLOW_ARTIFACTS ?= runs/mlflow-artifacts
MLFLOW_PORT ?= 5000
mlflow-ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri sqlite:///$(abspath $(MLFLOW_STORE)) \
		--artifacts-destination $(abspath $(MLFLOW_ARTIFACTS)) --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

# On a GPU machine without network: `make gpu-check` installs the wheels of .whl/ (made here, with network, by
# `make gpu-wheels`) into a temporary folder and runs every GPU stage with the machine's own python3 (torch,
# transformers, peft). One results file: GPU_CHECK_OUT. About 5 minutes on one H200.
GPU_PYTHON ?= python3
WHEELS ?= .whl
GPU_CHECK_OUT ?= gpu_check.json
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py --wheels $(WHEELS) --out $(GPU_CHECK_OUT)

# deepspeed has no wheel on PyPI: build its pure-Python one here (no ops compiled; they build on first use).
# The rest (webdataset, mlflow and what the GPU machine lacks of their needs): bench/gpu_wheels.txt, about 37 MB.
DEVICE_PLATFORM := --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
gpu-wheels: $(STAMP)
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	DS_BUILD_OPS=0 $(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w $(WHEELS) deepspeed==0.19.8
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: $(DEVICE_PLATFORM) -d $(WHEELS) -r bench/gpu_wheels.txt

bench-loader: $(STAMP)
	$(BIN)/python bench/loader.py

# The CPU benchmarks, each printing its table (figures: docs/benchmarks.md); bench/gpu_step.py needs a GPU.
bench: bench-loader
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/padding.py
	$(BIN)/python bench/fusion_cost.py

clean:
	rm -rf $(VENV) shards/demo runs/demo runs/demo-first runs/demo-phased runs/tiny-llm .pytest_cache
