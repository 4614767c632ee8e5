"""The `Engine` protocol: the only thing `server/` knows about a backend.

An engine takes a local Hugging Face folder and options. It knows nothing of deployments,
the registry or HTTP. Prompts reach it as token ids; it streams back text deltas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "tool_calls"]  # tool_calls: set by the API, never by an engine
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy (vLLM draws the same line)


@dataclass(frozen=True)
class OutputFormat:
    """Output held to a grammar token by token (vLLM's structured outputs): JSON (`spec`
    None: any object; else valid against that JSON schema, as JSON text), text that the
    regular expression `spec` matches whole, exactly one of `choices`, or text of the grammar
    `spec` (EBNF as xgrammar reads it, or Lark: a grammar with no `::=` is Lark, vLLM's rule)."""

    spec: str | None = None
    param: str = "response_format"  # the request's field it comes from, for errors
    kind: Literal["json", "regex", "choice", "grammar"] = "json"
    choices: tuple[str, ...] = ()

    @property
    def is_lark(self) -> bool:
        return self.kind == "grammar" and "::=" not in (self.spec or "")


@dataclass(frozen=True)
class ThinkingBudget:
    """At most `max_tokens` tokens in each thought, which opens with the tokens `start_ids`
    and is closed by force with `end_ids` (thinking.py has the rules)."""

    max_tokens: int
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    is_target: bool = False  # Anthropic's budget_tokens: an engine that cannot hold it serves without it


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # below MIN_TEMPERATURE (0 included): greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    output_format: OutputFormat | None = None  # None: free text
    top_k: int = 0  # the k most likely tokens only; 0: every token
    min_p: float = 0.0  # only tokens at least this fraction as likely as the most likely one
    repetition_penalty: float = 1.0  # divides (multiplies, if negative) the logits of tokens in the prompt or output
    min_tokens: int = 0  # no end of sequence, stop token or stop string before this many tokens
    ignore_eos: bool = False  # an end-of-sequence token does not end the generation (benchmarks' fixed lengths)
    stop_token_ids: tuple[int, ...] = ()  # more tokens that end it as an end of sequence does (their text is not sent)
    include_stop_str_in_output: bool = False  # the stop string that ended it is sent too
    skip_special_tokens: bool = True  # special tokens' text is left out of the output
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's and the k most likely before it (raw, no temperature)
    thinking: ThinkingBudget | None = None  # None: a reasoning model thinks as long as it likes

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.repetition_penalty != 1.0)

    @property
    def truncates(self) -> bool:
        """Draws from fewer tokens than top_p alone keeps (greedy takes the best: no need)."""
        return not self.is_greedy and (self.top_k > 0 or self.min_p > 0.0)


class Candidate(NamedTuple):
    """One of the most likely tokens at a position."""

    token: str
    logprob: float
    token_id: int


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability, and the most likely alternatives' (best first). A
    prompt's first token has none (None): nothing came before it. `rank` (1: the most
    likely) is reported for a prompt's tokens, as vLLM's prompt logprobs give it."""

    token: str
    logprob: float | None
    top: tuple[Candidate, ...] = ()
    token_id: int | None = None
    rank: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: Sequence[int]
    sampling: SamplingParams
    adapter: Path | None = None  # a LoRA adapter folder the engine has loaded (`AdapterEngine`): its weights, added to the base's
    priority: int = 0  # vLLM's: lower is sooner; among generations waiting for a place in the batch, the soonest goes first


@dataclass(frozen=True)
class Chunk:
    """A piece of one generation. The last chunk of a generation has a finish_reason."""

    text: str
    num_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token in this chunk, when asked for
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # one per prompt token, on a generation's first chunk, when asked for
    stop_sequence: str | None = None  # on the last chunk: the stop string that ended the generation, if one did
    token_ids: tuple[int, ...] = ()  # the num_tokens tokens generated, by id (an engine that knows them)
    num_cached_tokens: int = 0  # on a generation's first chunk: its prompt tokens the engine's prefix cache held


@dataclass(frozen=True)
class EngineHealth:
    is_ready: bool
    num_running: int
    num_waiting: int
    details: dict = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A loaded model that serves generations.

    Rules: `start` before anything else; `generate` may be called concurrently from the
    event loop; closing the iterator early aborts that generation and frees its place;
    `stop` ends every pending generation with `EngineStoppedError` and frees memory.
    """

    name: str  # the backend, for status pages ("transformers", "vllm")

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...  # token ids a request may name (logit_bias) are below it

    @property
    def tokenizer(self): ...  # the Hugging Face tokenizer prompts are read with (tool parsers look up markers in it)

    async def start(self) -> None: ...

    def tokenize(self, text: str) -> list[int]: ...

    def tokenize_chat(self, messages: list[dict], tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]: ...

    async def abort(self, request_id: str) -> None: ...

    def health(self) -> EngineHealth: ...

    async def stop(self) -> None: ...


@runtime_checkable
class SleepingEngine(Protocol):
    """An engine that can give its accelerator memory back and stay loaded (vLLM's sleep mode
    on GPU). Rules: nothing generates while asleep; `wake_up` makes it ready again."""

    @property
    def can_sleep(self) -> bool: ...

    async def sleep(self) -> None: ...

    async def wake_up(self) -> None: ...


@runtime_checkable
class ReloadingEngine(Protocol):
    """An engine that swaps its weights in place for a version of the same layout (the
    `reload` strategy). Rules: the caller drains first, so nothing should be generating;
    whatever still is ends with `EngineStoppedError`. The tokenizer and chat template come
    from `path` too. If it raises, the weights may be a mix: the caller reloads the old path."""

    async def reload_weights(self, path: Path) -> None: ...


@runtime_checkable
class AdapterEngine(Protocol):
    """An engine that serves LoRA adapters unmerged beside its base weights, a different one
    per request in the same batch (vLLM's multi-LoRA). Rules: an adapter is loaded before a
    request names it, and unloaded once nothing generates with it (shared_engine.py aborts
    its own generations first); a request naming one not loaded ends with `EngineStoppedError`."""

    async def load_adapter(self, adapter: Path, name: str) -> None: ...  # name: what the engine's metrics call it

    async def unload_adapter(self, adapter: Path) -> None: ...


@runtime_checkable
class EmbeddingEngine(Protocol):
    """An engine that embeds prompts (`/v1/embeddings`): one unit vector per prompt, from the
    model's last hidden states (`pooling.py` has the rule). `embeds` and `generates` say what
    it does as started (vLLM's pooling runner embeds and generates nothing)."""

    @property
    def embeds(self) -> bool: ...

    @property
    def generates(self) -> bool: ...

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]: ...


def engine_process_ids(engine: Engine) -> list[int]:
    """The processes an engine runs in, where it can say (for GPU memory per engine)."""
    process_ids = getattr(engine, "process_ids", None)
    return process_ids() if process_ids else []


def can_sleep(engine: Engine) -> bool:
    return isinstance(engine, SleepingEngine) and engine.can_sleep


def can_reload(engine: Engine) -> bool:
    return isinstance(engine, ReloadingEngine)


def can_embed(engine: Engine) -> bool:
    return isinstance(engine, EmbeddingEngine) and engine.embeds


def can_generate(engine: Engine) -> bool:
    return not isinstance(engine, EmbeddingEngine) or engine.generates
