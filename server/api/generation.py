"""From a validated OpenAI body to engine generations: limits, sampling, `n` choices."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace

from server.engines.base import MIN_TEMPERATURE, Chunk, Engine, GenerationRequest, SamplingParams, ThinkingBudget
from server.engines.generation_config import SamplingDefaults
from models.errors import ContextLengthExceededError, InvalidRequestError
from server.api.schemas import ChatCompletionRequest, CompletionRequest
from server.api.tools import OutputReader, ToolCall, ToolCallPiece


MAX_SEED = 2**63 - 1  # seeds are signed 64-bit in torch and vLLM
MAX_GENERATIONS = 64  # prompts x n in one request: one request may not fill the engine's queue for all others
# What a setting is where neither the request nor the serving version sets it: the engine
# protocol's own defaults (OpenAI's, and vLLM's neutral ones).
OPENAI_SAMPLING = SamplingParams(max_tokens=0)


@dataclass(frozen=True)
class ChoiceChunk:
    index: int
    chunk: Chunk
    tool_calls: tuple[ToolCall, ...] = ()  # read from the choice's output, whole, with its last chunk
    call_pieces: tuple[ToolCallPiece, ...] = ()  # the same calls, as they stream
    reasoning: str = ""  # thinking read apart from the content (reasoning.py)


@dataclass
class CachedTokens:
    """The prompt tokens an engine's prefix cache held, as usage counts them: each prompt's
    once, from its first choice (choices are prompt-major, `choices_per_prompt` to a prompt)."""

    choices_per_prompt: int = 1
    num_tokens: int = 0

    def count(self, item: ChoiceChunk) -> int:
        """Counts the chunk's; returns how many that added."""
        added = item.chunk.num_cached_tokens if item.index % self.choices_per_prompt == 0 else 0
        self.num_tokens += added
        return added


async def read_tool_calls(choices: AsyncIterator[ChoiceChunk], new_reader: Callable[[], OutputReader], num_choices: int) -> AsyncIterator[ChoiceChunk]:
    """Each choice's output read through a reader of its own (`ToolPlan.reader`): content
    passes (or is held), call pieces stream as the reader has them, and the calls found
    come whole with the last chunk, whose finish reason becomes `tool_calls` when the model
    stopped on its own."""
    readers = [new_reader() for _ in range(num_choices)]
    async with aclosing(choices) as stream:
        async for item in stream:
            reader, chunk = readers[item.index], item.chunk
            text = reader.feed(chunk.text)
            if not chunk.finish_reason:
                yield replace(item, chunk=replace(chunk, text=text), call_pieces=tuple(reader.pieces()))
                continue
            rest, calls = reader.finish()
            reason = "tool_calls" if calls and chunk.finish_reason == "stop" else chunk.finish_reason
            yield replace(item, chunk=replace(chunk, text=text + rest, finish_reason=reason), tool_calls=tuple(calls), call_pieces=tuple(reader.pieces()))


def check_choices(num_prompts: int, n: int, max_n: int) -> None:
    """Before any prompt is tokenized or queued: n within max_n, and prompts x n within
    MAX_GENERATIONS (or max_n, where an operator set it higher)."""
    if n > max_n:
        raise InvalidRequestError(f"n must be at most {max_n}.", param="n")
    limit = max(MAX_GENERATIONS, max_n)
    if num_prompts * n > limit:
        raise InvalidRequestError(f"This request asks for {num_prompts * n} generations ({num_prompts} prompt(s) x n={n}); at most {limit} are accepted.", param="prompt")


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int, prompt_param: str, default: int | None = None) -> int:
    """Tokens left for the completion. Unset, it is the version's default (`max_new_tokens`)
    where that fits, else all the room the context has; set, it must fit."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, your {prompt_param} "
            f"resulted in {num_prompt_tokens} tokens. Please reduce the length of the {prompt_param}.",
            param=prompt_param,
        )
    if requested is not None and requested > room:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the {prompt_param}, {requested} in "
            "the completion). Please reduce the length of the prompt or the completion.",
            param="max_tokens",
        )
    if requested is not None:
        return requested
    return min(room, default) if default is not None else room


def check_token_ids(token_ids: Sequence[int], vocab_size: int, param: str) -> None:
    """Token ids a request names (a prompt, a logit bias) must be in the vocabulary."""
    if unknown := [token_id for token_id in token_ids if not 0 <= token_id < vocab_size]:
        raise InvalidRequestError(f"Token id {unknown[0]} in {param} is not in the model's vocabulary (ids 0 to {vocab_size - 1}).", param=param)


def build_requests(
    body: ChatCompletionRequest | CompletionRequest,
    prompts: Sequence[Sequence[int]],
    max_model_len: int,
    max_prompt_tokens: int | None = None,
    max_completion_tokens: int | None = None,
    vocab_size: int | None = None,
    defaults: SamplingDefaults = SamplingDefaults(),
    thinking: ThinkingBudget | None = None,
    priority: int = 0,
) -> list[GenerationRequest]:
    """n generations per prompt (`check_choices` bounded them), indexed prompt-major as
    OpenAI does, sampling as `sampling_of` says and thinking held to `thinking`. A seed gives
    choice i the seed + i, so that choices differ yet the whole answer is reproducible."""
    if vocab_size is not None and body.logit_bias:
        check_token_ids([int(token) for token in body.logit_bias], vocab_size, "logit_bias")
    if vocab_size is not None and body.stop_token_ids:
        check_token_ids(body.stop_token_ids, vocab_size, "stop_token_ids")
    if body.seed is not None and body.seed + body.n - 1 > MAX_SEED:
        raise InvalidRequestError(f"seed + n - 1 must be at most {MAX_SEED} (choice i uses seed + i).", param="seed")
    prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    shared = replace(sampling_of(body, defaults), thinking=thinking)  # what every choice shares; each sets its length and seed
    requests = []
    requested = body.requested_max_tokens
    if max_completion_tokens is not None and requested is not None and requested > max_completion_tokens:
        raise InvalidRequestError(f"max_tokens must be at most {max_completion_tokens} on this server.", param="max_tokens", code="max_tokens_too_large")
    for prompt in prompts:
        if max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
            raise InvalidRequestError(
                f"The {prompt_param} has {len(prompt)} tokens; this server accepts at most {max_prompt_tokens}.", param=prompt_param, code="prompt_too_long"
            )
        max_tokens = resolve_max_tokens(requested, len(prompt), max_model_len, prompt_param, defaults.max_tokens)
        if max_completion_tokens is not None:
            max_tokens = min(max_tokens, max_completion_tokens)
        if body.min_tokens > max_tokens:
            raise InvalidRequestError(f"min_tokens ({body.min_tokens}) must be at most max_tokens ({max_tokens}).", param="min_tokens")
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            # An engine generates one token at least: echo's max_tokens 0 drops it (echo.py).
            requests.append(GenerationRequest(uuid.uuid4().hex, prompt, replace(shared, max_tokens=max(max_tokens, 1), seed=seed), priority=priority))
    return requests


def sampling_of(body: ChatCompletionRequest | CompletionRequest, defaults: SamplingDefaults) -> SamplingParams:
    """Rule: each setting is the request's, else the serving version's default (its
    generation_config.json), else OpenAI's. max_tokens is left to each prompt."""

    def chosen(name: str):
        value = getattr(body, name)
        value = getattr(defaults, name) if value is None else value
        return getattr(OPENAI_SAMPLING, name) if value is None else value

    temperature = chosen("temperature")
    return SamplingParams(
        max_tokens=0,
        # A temperature this small is greedy in all but name; dividing logits by it overflows.
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_p=chosen("top_p"),
        stop=body.stop_sequences,
        presence_penalty=chosen("presence_penalty"),
        frequency_penalty=chosen("frequency_penalty"),
        logit_bias=body.logit_bias_pairs,
        logprobs=body.num_top_logprobs,
        prompt_logprobs=body.num_prompt_logprobs,
        output_format=body.output_format,
        top_k=max(chosen("top_k"), 0),  # vLLM's -1 means all, as 0 does
        min_p=chosen("min_p"),
        repetition_penalty=chosen("repetition_penalty"),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
    )


async def stream_choices(engine: Engine, requests: list[GenerationRequest]) -> AsyncIterator[ChoiceChunk]:
    """Run the generations together and yield their chunks as they come. Closing this
    iterator (a client went away) aborts every generation still running."""
    if len(requests) == 1:
        async with aclosing(engine.generate(requests[0])) as chunks:
            async for chunk in chunks:
                yield ChoiceChunk(0, chunk)
        return
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(engine, request, index, queue)) for index, request in enumerate(requests)]
    try:
        num_unfinished = len(requests)
        while num_unfinished:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield item
            num_unfinished -= bool(item.chunk.finish_reason)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(engine: Engine, request: GenerationRequest, index: int, queue: asyncio.Queue) -> None:
    try:
        async with aclosing(engine.generate(request)) as chunks:
            async for chunk in chunks:
                queue.put_nowait(ChoiceChunk(index, chunk))
    except Exception as error:
        queue.put_nowait(error)
