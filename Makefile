# The commands the README names. Everything installs into .venv; nothing is needed beforehand
# but python3 (3.11+) with venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

# Flower runs offline and never builds an environment of its own (see README).
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
# Flower's CLIs start each other by name (flower-superlink runs flower-superexec).
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test lint bench dashboard docs clean help

help:
	@echo "make run    set up .venv, install, run the default experiment (ARGS='--rounds 5' to change it)"
	@echo "make test   install dev dependencies, run lint, type checks and the whole test suite (TEST_WORKERS=2)"
	@echo "make lint   ruff and mypy only"
	@echo "make bench  run the benchmark scripts in benchmarks/"
	@echo "make dashboard  live dashboard of ./runs on http://127.0.0.1:8501"
	@echo "make docs   regenerate docs/options.md from the code"

# torch first, pinned to the CPU build: a looser request makes pip pull several GB of CUDA
# packages. medmnist with --no-deps: its own requirements pull torchvision (and a CUDA torch),
# and medbloom only reads its metadata table.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps medmnist==3.0.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/medbloom run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# Two pytest workers (pytest-xdist): the end-to-end runs spend part of their time
# waiting (process start-up, timeouts), so two at once finish sooner on two cores.
TEST_WORKERS ?= 2

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(ARGS)

docs: $(STAMP)
	$(BIN)/python -m medbloom.reference > docs/options.md

dashboard: $(STAMP)
	$(BIN)/medbloom dashboard $(ARGS)

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
