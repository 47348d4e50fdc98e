# Two commands do all the set-up: `make demo` (main job) and `make test` (the suite).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck pytest demo bench-loss clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

# The demo takes the cores no other job keeps busy (fgdistill's default --threads). On a machine
# that other jobs share, OMP_WAIT_POLICY=PASSIVE (set before the call) avoids spinning threads.
demo: $(STAMP)
	$(BIN)/fgdistill demo

bench-loss: $(STAMP)
	$(BIN)/python benchmarks/loss_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
