#!/usr/bin/env bash
# The GPU checks in one go, on a GPU node without a network (see the README's "GPU test loop").
# Before: the offline bundle's parts copied to /tmp/baton-bundle (device runs carry at most
# 64 MiB: carry .gpu-bundle/p1 in one run and copy it there, then .gpu-bundle/p2 and
# .gpu-bundle/node in the next; carry .gpu-bundle/node on every later run too: a path not
# carried is removed on the node). From the checkout's root:
#
#   bash tests/gpu/run_on_node.sh tests      # tests/gpu (about 8 minutes)
#   bash tests/gpu/run_on_node.sh adapters   # tests/gpu/test_gpu_adapters.py alone: unmerged LoRA swaps (about 2)
#   bash tests/gpu/run_on_node.sh options    # tests/gpu/test_gpu_engine_options.py alone: ngram speculation, fp8 KV
#                                            # cache, priority scheduling on vLLM 0.26 (about 1)
#   bash tests/gpu/run_on_node.sh swaps      # swap_under_load.py, reload, adapter and replace, 1B model (about 7)
#   bash tests/gpu/run_on_node.sh overhead   # overhead_vs_vllm.py, c=1/16/64, 1B model, both servers up,
#                                            # three rounds (about 6)
#   bash tests/gpu/run_on_node.sh overhead-nosleep  # the same, baton's engine without sleep mode (vLLM's
#                                                   # own allocator, as the anchor runs): what sleep mode costs
#   bash tests/gpu/run_on_node.sh transformers  # sampling_kernel.py (the kernel against its reference), then
#                                               # transformers_cuda.py: the engine with CUDA graphs, without, and
#                                               # vLLM's server, SmolLM2-135M's shape, c=1/8/32 (about 5)
#   bash tests/gpu/run_on_node.sh prefill    # prefix_cache.py and long_prompts.py --compare chunking: the transformers
#                                            # engine's prefix cache and chunked prefill, each on and off, SmolLM2's shape (about 4)
#
# Logs and JSON go to $OUT (the device tool's folder that comes back), else /tmp/baton-gpu-out.
set -uo pipefail
out=${OUT:-/tmp/baton-gpu-out}
mkdir -p "$out"
. .gpu-bundle/node/setup.sh >/dev/null || exit 1
export BATON_GPU_TOKENIZER=$PWD/.gpu-bundle/node/tok BATON_HOME=/tmp/baton-home
quiet='EngineCore|^INFO|^WARNING|^\[W|^\(APIServer'
model() { [ -d /tmp/m1b ] || python3 benchmarks/random_model.py /tmp/m1b --shape 1b --tokenizer "$BATON_GPU_TOKENIZER" >/dev/null 2>&1; }
smol() { [ -d /tmp/smol ] || python3 benchmarks/random_model.py /tmp/smol --shape smol --tokenizer "$BATON_GPU_TOKENIZER" >/dev/null 2>&1; }
case ${1:-tests} in
  tests) timeout 560 python3 -m pytest tests/gpu -s -W default -p no:cacheprovider --ignore tests/gpu/test_gpu_engine_options.py 2>&1 | tee "$out/gpu-tests.log" | grep -Ev "$quiet" ;;
  options) timeout 300 python3 -m pytest tests/gpu/test_gpu_engine_options.py -s -W default -p no:cacheprovider 2>&1 | tee "$out/gpu-options.log" | grep -Ev "$quiet" ;;
  adapters) timeout 300 python3 -m pytest tests/gpu/test_gpu_adapters.py -s -W default -p no:cacheprovider 2>&1 | tee "$out/gpu-adapters.log" | grep -Ev "$quiet" ;;
  swaps) model; timeout 500 python3 benchmarks/swap_under_load.py --engine vllm --model /tmp/m1b --strategies reload adapter replace --seconds 25 --swap-at 8 --rate 4 2>&1 | grep -Ev "$quiet"
         cp benchmarks/results/swap_under_load.json benchmarks/results/swap_*.log "$out/" 2>/dev/null ;;
  overhead|overhead-nosleep)
            model; [ "$1" = overhead-nosleep ] && nosleep=--baton-arg=--engine-option=sleep_mode=false || nosleep=
            timeout 560 python3 benchmarks/overhead_vs_vllm.py --model /tmp/m1b --concurrency 1 16 64 --requests 64 --max-tokens 128 $nosleep 2>&1 | grep -Ev "$quiet"
            cp benchmarks/results/overhead_vs_vllm.json "$out/$1.json" 2>/dev/null ;;
  transformers) smol; timeout 60 python3 benchmarks/sampling_kernel.py 2>&1 | tee "$out/sampling_kernel.log"
                timeout 480 python3 benchmarks/transformers_cuda.py --model /tmp/smol --concurrency 1 8 32 --max-tokens 128 --out "$out/transformers_cuda.json" 2>&1 | grep -Ev "$quiet" ;;
  prefill) smol; timeout 240 python3 benchmarks/prefix_cache.py --model /tmp/smol 2>&1 | grep -Ev "$quiet"
           timeout 240 python3 benchmarks/long_prompts.py --compare chunking --model /tmp/smol 2>&1 | grep -Ev "$quiet"
           cp benchmarks/results/prefix_cache.json benchmarks/results/long_prompts_chunking.json "$out/" 2>/dev/null ;;
  *) echo "usage: $0 tests|adapters|options|swaps|overhead|overhead-nosleep|transformers|prefill" >&2; exit 2 ;;
esac
