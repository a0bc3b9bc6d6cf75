# Two commands a newcomer needs (see README.md):
#   make test   - create .venv (torch 2.13.0 CPU first, then this project) and run the test suite
#   make train  - the main job on the embedded default: demo shards + tiny LLM (built if missing),
#                 2 CPU ranks under deepspeed on ds_configs/zero2.json, MLflow store in runs/demo
#   make demo   - build the demo shards under shards/demo and summarise them
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint train demo bench-loader clean

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

bench-loader: $(STAMP)
	$(BIN)/python bench/loader.py

clean:
	rm -rf $(VENV) shards/demo runs/demo runs/tiny-llm .pytest_cache
