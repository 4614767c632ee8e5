"""From a validated OpenAI body to engine generations: limits, sampling, `n` choices."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace

from server.engines.base import MIN_TEMPERATURE, Chunk, Engine, GenerationRequest, SamplingParams
from models.errors import ContextLengthExceededError, InvalidRequestError
from server.api.schemas import ChatCompletionRequest, CompletionRequest
from server.api.tools import OutputReader, ToolCall, ToolCallPiece


MAX_SEED = 2**63 - 1  # seeds are signed 64-bit in torch and vLLM
MAX_GENERATIONS = 64  # prompts x n in one request: one request may not fill the engine's queue for all others


@dataclass(frozen=True)
class ChoiceChunk:
    index: int
    chunk: Chunk
    tool_calls: tuple[ToolCall, ...] = ()  # read from the choice's output, whole, with its last chunk
    call_pieces: tuple[ToolCallPiece, ...] = ()  # the same calls, as they stream


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
                yield ChoiceChunk(item.index, replace(chunk, text=text), (), tuple(reader.pieces()))
                continue
            rest, calls = reader.finish()
            reason = "tool_calls" if calls and chunk.finish_reason == "stop" else chunk.finish_reason
            yield ChoiceChunk(item.index, replace(chunk, text=text + rest, finish_reason=reason), tuple(calls), tuple(reader.pieces()))


def check_choices(num_prompts: int, n: int, max_n: int) -> None:
    """Before any prompt is tokenized or queued: n within max_n, and prompts x n within
    MAX_GENERATIONS (or max_n, where an operator set it higher)."""
    if n > max_n:
        raise InvalidRequestError(f"n must be at most {max_n}.", param="n")
    limit = max(MAX_GENERATIONS, max_n)
    if num_prompts * n > limit:
        raise InvalidRequestError(f"This request asks for {num_prompts * n} generations ({num_prompts} prompt(s) x n={n}); at most {limit} are accepted.", param="prompt")


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int, prompt_param: str) -> int:
    """Tokens left for the completion; unset means all the room the context has."""
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
    return requested if requested is not None else room


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
) -> list[GenerationRequest]:
    """n generations per prompt (`check_choices` bounded them), indexed prompt-major as
    OpenAI does. A seed gives choice i the seed + i, so that choices differ yet the whole
    answer is reproducible."""
    if vocab_size is not None and body.logit_bias:
        check_token_ids([int(token) for token in body.logit_bias], vocab_size, "logit_bias")
    if body.seed is not None and body.seed + body.n - 1 > MAX_SEED:
        raise InvalidRequestError(f"seed + n - 1 must be at most {MAX_SEED} (choice i uses seed + i).", param="seed")
    # A temperature this small is greedy in all but name; dividing logits by it overflows.
    temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
    prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    # What every choice shares, read from the body once; each choice sets its length and seed.
    shared = SamplingParams(
        0,
        temperature,
        body.top_p,
        None,
        body.stop_sequences,
        body.presence_penalty,
        body.frequency_penalty,
        body.logit_bias_pairs,
        body.num_top_logprobs,
        body.json_format,
    )
    requests = []
    requested = body.requested_max_tokens
    if max_completion_tokens is not None and requested is not None and requested > max_completion_tokens:
        raise InvalidRequestError(f"max_tokens must be at most {max_completion_tokens} on this server.", param="max_tokens", code="max_tokens_too_large")
    for prompt in prompts:
        if max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
            raise InvalidRequestError(
                f"The {prompt_param} has {len(prompt)} tokens; this server accepts at most {max_prompt_tokens}.", param=prompt_param, code="prompt_too_long"
            )
        max_tokens = resolve_max_tokens(requested, len(prompt), max_model_len, prompt_param)
        if max_completion_tokens is not None:
            max_tokens = min(max_tokens, max_completion_tokens)
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            requests.append(GenerationRequest(uuid.uuid4().hex, prompt, replace(shared, max_tokens=max_tokens, seed=seed)))
    return requests


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
