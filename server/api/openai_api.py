"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Protocol
from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from models.errors import BatonError, ClientDisconnectedError, ForbiddenError, EngineError, InvalidRequestError, EngineStoppedError, ModelNotFoundError, ModelSwappedError, NotFoundError
from server.api.reasoning import PROMPT_TAIL_TOKENS, ReasoningSplitter, ReasoningTally, prompt_opens_reasoning, read_reasoning, reads_reasoning
from server.api.echo import echo_texts, echoed
from server.api.truncation import answer_room, fitted_prompt
from server.batches.in_process import ON_BEHALF_OF
from server.api.generation import CachedTokens, ChoiceChunk, build_requests, check_choices, check_token_ids, read_tool_calls, stream_choices
from server.api.shapes import ChatFormat, TextFormat, TokenFields
from server.api.tool_formats import format_taught_by
from server.api.tools import ToolCall
from server.api.observation import RequestObservation, Unobserved
from server.auth.addresses import is_loopback
from server.deployments.slot import Lease
from server.deployments.router import Route
from server.auth.keys import authorize, bearer_token, priority_of
from server.api.schemas import ChatCompletionRequest, CompletionRequest
from server.engines.base import SamplingParams, ThinkingBudget, TokenLogprob, can_generate
from server.engines.thinking import tags_of

log = logging.getLogger(__name__)
DISCONNECT_CHECK_S = 0.5  # how often a non-streaming request checks that its client is still there


async def admit(request: Request) -> None:
    """Admission for inference: none while shutting down, then a key (a bearer token, or
    x-api-key) with the inference scope (where any key has it), within its rate; the key
    is kept for the deployment check.
    Async though it awaits nothing: FastAPI runs a plain function on a worker thread, and the
    rate buckets must change on the event loop only (and a thread hop costs every request)."""
    request.state.lifecycle.refuse_new_requests()
    if (caller := request.scope.get(ON_BEHALF_OF)) is not None:  # made in-process (a batch's, a mirror's): its key was checked, and its maker paces it
        request.state.key = caller.key
        return
    # Anthropic's SDK sends its key as x-api-key: the same key, another header.
    token = bearer_token(request.headers.get("authorization", "")) or request.headers.get("x-api-key") or None
    request.state.key = authorize(request.state.keys, "inference", token, is_loopback(request.client.host if request.client else ""))
    request.state.rate_limits.admit(request.state.key)


def _check_deployment(request: Request, name: str) -> None:
    key = request.state.key
    if key is not None and not key.may_call(name):
        raise ForbiddenError(f"The key {key.name!r} may not call the model '{name}'.", param="model", code="model_not_allowed")


def route_request(request: Request, model: str, user: str | None = None, priority: int = 0) -> Route:
    """Where `model` sends the request (DeploymentManager.route), if the key may call that
    deployment, at the `priority` asked where its key allows it (priority_of). Rule: a key
    limited to some deployments learns nothing of the others: whatever it names outside
    them, known or not, is a 403."""
    try:
        route = request.state.router.route(model, user)
    except ModelNotFoundError:
        _check_deployment(request, model)
        raise
    _check_deployment(request, route.deployment)
    return replace(route, priority=priority_of(request.state.key, priority))


router = APIRouter(prefix="/v1", dependencies=[Depends(admit)])


def _callable_names(request: Request) -> list[str]:
    key = request.state.key
    return [d.name for d in request.state.deployments.deployments if key is None or key.may_call(d.name)]


def _model_card(request: Request, model: str, route: Route) -> dict:
    """OpenAI's card, with vLLM's `root` (here: the version the model names now),
    `max_model_len` (that version's context, while it is loaded; else null) and `parent` (for
    an unmerged LoRA adapter, the version it was trained on; else null)."""
    deployment = request.state.deployments.get(route.deployment)
    slot = next((slot for role, slot in deployment.roles() if role != "standby" and slot.version == route.version), None) if route.version else deployment.active
    return {
        "id": model,
        "object": "model",
        "created": request.state.started_at,
        "owned_by": "baton",
        "root": route.version or deployment.target_version,
        "max_model_len": slot.engine.max_model_len if slot is not None else None,
        "parent": slot.target.adapter_base if slot is not None else None,
    }


@router.get("/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(request, name, Route(name)) for name in _callable_names(request)]}


@router.get("/models/{model:path}")
async def get_model(model: str, request: Request) -> dict:
    """A deployment's card, or a pinnable version's (`chat@3`) while it is served."""
    try:
        route = route_request(request, model)
    except (ModelNotFoundError, ForbiddenError) as error:
        raise NotFoundError(f"The model '{model}' does not exist.", param="model", code="model_not_found") from error
    return _model_card(request, model, route)


@dataclass(frozen=True)
class Served:
    """What answered: the `model` field's value (served_as), the sampling applied (the
    request's settings, else the version's defaults) and the prompts as token ids."""

    model: str
    sampling: SamplingParams
    prompts: Sequence[Sequence[int]] = ()

    def prompt_of(self, index: int, num_choices: int) -> Sequence[int]:
        """Choice `index`'s prompt: choices are prompt-major, n to a prompt."""
        return self.prompts[index // self.choices_per_prompt(num_choices)]

    def choices_per_prompt(self, num_choices: int) -> int:
        return num_choices // len(self.prompts) if self.prompts else 1


class AnswerShape(Protocol):
    """How an answer is written, whole or streamed: chat and text completions' `choices`
    (`Choices`), or a Responses object (responses.py), which may also be generated in the
    background: answered at once (`in_background`), or streamed (`streamed_in_background`)."""

    runs_in_background: bool

    def in_background(self, choices: AsyncIterator[ChoiceChunk], served: Served, num_choices: int, num_prompt_tokens: int) -> Awaitable[dict]: ...

    def streamed_in_background(self, choices: AsyncIterator[ChoiceChunk], served: Served, num_choices: int, usage: _UsagePolicy) -> Awaitable[AsyncIterator[str]]: ...

    def collect(self, choices: AsyncIterator[ChoiceChunk], served: Served, num_choices: int, num_prompt_tokens: int) -> Awaitable[dict]: ...

    def events(self, choices: AsyncIterator[ChoiceChunk], served: Served, num_choices: int, usage: _UsagePolicy) -> AsyncIterator[str]: ...


@dataclass(frozen=True)
class Choices:
    """Chat and text completions: `choices`, streamed as chunks of deltas; with `keep` (chat's
    `store: true`), the whole completion is kept once it has ended well, streamed or not."""

    fmt: ChatFormat | TextFormat
    keep: Callable[[dict], Awaitable[None]] | None = None
    runs_in_background = False

    def _head(self, served: Served) -> dict:
        return {"id": self.fmt.id_prefix + uuid.uuid4().hex, "object": self.fmt.object, "created": int(time.time()), "model": served.model}

    async def collect(self, choices, served: Served, num_choices: int, num_prompt_tokens: int) -> dict:
        completion = await _collect(choices, self.fmt, self._head(served), num_choices, num_prompt_tokens, served)
        if self.keep is not None:
            await self.keep(completion)
        return completion

    def events(self, choices, served: Served, num_choices: int, usage: _UsagePolicy) -> AsyncIterator[str]:
        head = self._head(served)
        if self.keep is None:
            return _sse(choices, self.fmt, {**head, "object": self.fmt.chunk_object}, num_choices, usage, served)
        return self._kept_events(choices, head, served, num_choices, usage)

    async def _kept_events(self, choices, head: dict, served: Served, num_choices: int, usage: _UsagePolicy) -> AsyncIterator[str]:
        """The stream; before its `[DONE]` (so that a client that read it finds the completion
        kept), the same completion as it would have been sent whole, under the stream's id. A
        stream that ended with an error has no `[DONE]`, and keeps nothing."""
        seen: list[ChoiceChunk] = []

        async def recorded() -> AsyncIterator[ChoiceChunk]:
            async with aclosing(choices) as stream:
                async for item in stream:
                    seen.append(item)
                    yield item

        async for event in _sse(recorded(), self.fmt, {**head, "object": self.fmt.chunk_object}, num_choices, usage, served):
            if event == _DONE:
                await self.keep(await _collect(_replayed(seen), self.fmt, head, num_choices, usage.num_prompt_tokens, served))
            yield event


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    keep = await _completion_keeper(request, body) if body.store else None
    return await answer_chat(request, body, Choices(ChatFormat(body.logprobs is True, token_fields(body)), keep))


async def _completion_keeper(request: Request, body: ChatCompletionRequest) -> Callable[[dict], Awaitable[None]]:
    """How a `store: true` completion is kept: with its request's metadata, and its messages
    as the client sent them, as its key's (completion_store.py)."""
    store = kept_in(request.state.completions, "chat completions", "completion_not_found", "store")
    owner, messages = owner_of(request), (await request.json())["messages"]  # the body is read already: this is its cached copy

    async def keep(completion: dict) -> None:
        await asyncio.to_thread(store.keep, owner, {**completion, "metadata": body.metadata or {}}, messages)

    return keep


def kept_in(store, kinds: str, code: str, param: str | None = None):
    """`store`, where the server keeps that state (`store_responses`). Where it keeps none,
    a request that asks for some (naming it in `param`) is a 400; a read of some, a 404."""
    if store is None:
        if param is not None:
            raise InvalidRequestError(f"This server keeps no {kinds} (store_responses is off): send what they would hold in the request.", param=param)
        raise NotFoundError(f"This server keeps no {kinds} (store_responses is off).", code=code)
    return store


def owner_of(request: Request) -> str:
    """Whose kept state (Responses, conversations, completions, files, batches) a request may
    read: its key's (on a server without keys, everyone's)."""
    return request.state.key.name if request.state.key is not None else ""


async def answer_chat(request: Request, body: ChatCompletionRequest, shape: AnswerShape, truncate: bool = False):
    """`truncate`: the oldest turns go until the prompt fits (truncation.py), as the Responses
    API's `truncation: "auto"` asks."""
    messages = [m.as_template_input() for m in body.messages]
    tools = body.tool_plan.template_tools() if body.tool_plan else None

    def tokenize(engine) -> list[list[int]]:
        render = partial(engine.tokenize_chat, tools=tools, template_kwargs=body.template_kwargs)
        if truncate:
            return [fitted_prompt(render, messages, answer_room(body.requested_max_tokens, engine.max_model_len), engine.max_model_len)]
        return [render(messages)]

    return await _respond(request, body, tokenize, shape, partial(_read_chat, body))


def _read_chat(body: ChatCompletionRequest, choices: AsyncIterator[ChoiceChunk], lease: Lease, prompts: list[list[int]]) -> AsyncIterator[ChoiceChunk]:
    """A version that reasons has its thinking read apart (reasoning.py), unless the output is
    held to a grammar (a schema, a forced call, structured outputs: it is all answer); then
    tool calls are read from the rest."""
    if body.output_format is None and (splitters := _reasoning_splitters(lease, prompts, body.n)):
        choices = read_reasoning(choices, splitters)
    if (plan := body.tool_plan) is not None:
        tokenizer = lease.engine.tokenizer
        tool_parser = lease.slot.target.options.get("tool_parser") or format_taught_by(getattr(tokenizer, "chat_template", None))
        choices = read_tool_calls(choices, partial(plan.reader, tool_parser, tokenizer), len(prompts) * body.n)
    return choices


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    read = partial(_read_echo, body) if body.echo else _as_generated
    fmt = TextFormat(body.logprobs is not None, token_fields(body))
    return await _respond(request, body, lambda engine: [_prompt_ids(engine, prompt) for prompt in body.prompt], Choices(fmt), read)


def token_fields(body: ChatCompletionRequest | CompletionRequest) -> TokenFields:
    return TokenFields(token_ids=body.return_token_ids, prompt_logprobs=body.prompt_logprobs is not None, as_ids=body.return_tokens_as_token_ids)


def _read_echo(body: CompletionRequest, choices: AsyncIterator[ChoiceChunk], lease: Lease, prompts: list[list[int]]) -> AsyncIterator[ChoiceChunk]:
    return echoed(choices, echo_texts(body.prompt, lease.engine.tokenizer), body.n, body.generates)


def _as_generated(choices: AsyncIterator[ChoiceChunk], lease: Lease, prompts: list[list[int]]) -> AsyncIterator[ChoiceChunk]:
    return choices


def _prompt_ids(engine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return engine.tokenize(prompt)
    check_token_ids(prompt, engine.vocab_size, "prompt")
    return prompt


async def _respond(request: Request, body, tokenize, shape: AnswerShape, read=_as_generated):
    """Lease a slot, generate on it, return the lease after the last byte; `read(choices,
    lease, prompts)` reads the generated choices into the answer's (reasoning, tool calls,
    echo). Rule: every path out of here returns the lease exactly once (Lease.release is
    idempotent)."""
    route = route_request(request, body.model, body.end_user, body.priority)  # an unknown model: 404, and no metric labelled with it
    check_choices(body.num_prompts, body.n, request.state.settings.max_n)
    lease, observation = await observed_lease(request, route)
    try:
        await request.state.mirrors.copy(request, route, lease)
        if not can_generate(lease.engine):
            raise InvalidRequestError(f"The model '{body.model}' is served for embeddings only (vLLM's pooling runner); ask /v1/embeddings.", param="model", code="model_not_supported")
        # Off the event loop, as vLLM's server does it: a 4 MiB prompt takes seconds to render
        # and tokenize, and every other stream would wait (the tokenizer releases the GIL).
        prompts = await asyncio.to_thread(tokenize, lease.engine)
        settings = request.state.settings
        requests = build_requests(
            body, prompts, lease.engine.max_model_len, settings.max_prompt_tokens, settings.max_completion_tokens, lease.engine.vocab_size,
            lease.slot.target.sampling_defaults, _thinking_budget(body, lease), route.priority,
        )  # fmt: skip
    except BaseException as error:
        lease.release()
        observation.finish(status_of(error))
        raise
    observation.prepared()
    served = Served(served_as(lease, body.model), requests[0].sampling, prompts)
    num_prompt_tokens = observation.num_prompt_tokens = sum(len(prompt) for prompt in prompts)
    choices = _on_lease(read(stream_choices(lease.engine, requests), lease, prompts), lease, observation, CachedTokens(served.choices_per_prompt(len(requests))))
    headers = served_headers(lease)
    if shape.runs_in_background:  # the lease goes with the generation's end (_on_lease), not with this answer
        try:
            return await _in_background(request, body, shape, choices, served, len(requests), num_prompt_tokens, headers)
        except BaseException as error:  # before the generation began: nothing else ends the request
            lease.release()
            observation.finish(status_of(error))
            raise
    if body.stream:
        events = shape.events(await _primed(request, choices), served, len(requests), _usage_policy(body, num_prompt_tokens, served, len(requests)))
        return StreamingResponse(events, media_type="text/event-stream", headers=headers, background=BackgroundTask(_release, lease))
    try:
        body = await _unless_disconnected(request, shape.collect(choices, served, len(requests), num_prompt_tokens))
        return JSONResponse(body, headers=headers)
    finally:
        lease.release()


async def _in_background(request: Request, body, shape: AnswerShape, choices, served: Served, num_choices: int, num_prompt_tokens: int, headers: dict):
    """The answer of a run that goes on in the background: its start at once, or its events
    as they come (which a client that leaves can follow again)."""
    if body.stream:
        usage = _usage_policy(body, num_prompt_tokens, served, num_choices)
        events = await shape.streamed_in_background(await _primed(request, choices), served, num_choices, usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    return JSONResponse(await shape.in_background(choices, served, num_choices, num_prompt_tokens), headers=headers)


async def observed_lease(request: Request, route: Route) -> tuple[Lease, RequestObservation | Unobserved]:
    """A lease on the slot `route` names, and what records the request from there on (a
    lease refused is recorded as the request's outcome)."""
    observation = observe(request, route.deployment)
    try:
        lease = await request.state.router.lease(route)
    except BaseException as error:
        observation.finish(status_of(error))
        raise
    observation.leased(lease.deployment, lease.slot.version, request.state.deployments.get(lease.deployment).window_of(lease.slot).add)
    return lease, observation


def _reasons(lease: Lease) -> bool:
    """The serving version thinks aloud in `<think>` tags (reasoning.py)."""
    return reads_reasoning(lease.slot.target.options.get("reasoning_parser"), getattr(lease.engine.tokenizer, "chat_template", None))


def _reasoning_splitters(lease: Lease, prompts: list[list[int]], n: int) -> list[ReasoningSplitter]:
    """One per choice (prompt-major), where the serving version reasons; none where it does not."""
    if not _reasons(lease):
        return []
    tokenizer = lease.engine.tokenizer
    return [ReasoningSplitter(prompt_opens_reasoning(tokenizer.decode(prompt[-PROMPT_TAIL_TOKENS:]))) for prompt in prompts for _ in range(n)]


def _thinking_budget(body: ChatCompletionRequest | CompletionRequest, lease: Lease) -> ThinkingBudget | None:
    """The request's budget, where the serving version reasons and its output is free text (a
    grammar holds all of it to the answer). A budget is a ceiling, which a model that does
    not think is under: elsewhere it asks nothing. No thought outlasts the context, so a budget
    beyond it is the context (an engine may keep it in 32 bits)."""
    if body.thinking_budget is None or body.output_format is not None or not _reasons(lease):
        return None
    return ThinkingBudget(min(body.thinking_budget, lease.engine.max_model_len), *tags_of(lease.engine.tokenizer), is_target=body.thinking_budget_is_target)


def served_as(lease: Lease, model: str) -> str:
    """What answered, as the `model` field names it: the registry version (`chat@2`), or the
    requested name for a local folder."""
    return lease.slot.version if lease.slot.target.is_from_registry else model


def served_headers(lease: Lease) -> dict:
    headers = {"x-baton-deployment": lease.deployment, "x-baton-version": lease.slot.version}
    if lease.fallback_from is not None:
        headers["x-baton-fallback-from"] = lease.fallback_from
    return headers


async def _release(lease: Lease) -> None:
    """The response's last step, on the event loop (a plain function would run on a worker thread)."""
    lease.release()


def observe(request: Request, deployment: str) -> RequestObservation | Unobserved:
    """What notes this request's metrics, log line, health outcome and token charge."""
    if not request.state.settings.request_metrics:
        return Unobserved()
    if request.scope.get(ON_BEHALF_OF) is not None:  # made in-process (a batch's, a mirror's): paced by its maker, it takes nothing from its key's rates
        return RequestObservation(request.state.metrics, request.state.request_id, deployment)
    key, rate_limits = request.state.key, request.state.rate_limits
    return RequestObservation(request.state.metrics, request.state.request_id, deployment, lambda num_tokens: rate_limits.charge_tokens(key, num_tokens))


async def _primed(request: Request, choices: AsyncIterator[ChoiceChunk]) -> AsyncIterator[ChoiceChunk]:
    """`choices` with its first item already in. Rule: a stream's status line waits for its
    first token (as OpenAI's API sends it), so that what fails before it (a grammar the engine
    refuses, an engine stopped by a swap) is the response's status, which clients read and
    retry on, not an error event after a 200."""
    try:
        first = await _unless_disconnected(request, anext(choices))
    except StopAsyncIteration:
        return choices
    return _after(first, choices)


async def _after(first: ChoiceChunk, rest: AsyncIterator[ChoiceChunk]) -> AsyncIterator[ChoiceChunk]:
    async with aclosing(rest):
        yield first
        async for item in rest:
            yield item


async def _unless_disconnected(request: Request, work: Awaitable):
    """Rule: a generation nobody waits for any more stops. A stream stops when a write fails;
    a non-streaming answer, and a stream until its first token, are watched for the client's
    disconnect meanwhile."""
    task = asyncio.ensure_future(work)
    while not (await asyncio.wait({task}, timeout=DISCONNECT_CHECK_S))[0]:
        if await request.is_disconnected():
            task.cancel()  # closes the generations, which aborts them in the engine
            await asyncio.gather(task, return_exceptions=True)
            raise ClientDisconnectedError("The client closed the connection before the answer was ready.")
    return task.result()


async def _on_lease(choices: AsyncIterator[ChoiceChunk], lease: Lease, observation: RequestObservation | Unobserved, cached: CachedTokens) -> AsyncIterator[ChoiceChunk]:
    """Release the lease and record the request when the stream ends, however it ends; a
    generation cut off by a swap's drain deadline ends with model_swapped rather than a bare
    engine error. `cached` counts the prompt tokens the prefix cache held as usage does."""
    status = 200
    try:
        async with aclosing(choices) as stream:
            async for item in stream:
                observation.tokens(item.chunk.num_tokens, cached.count(item))
                yield item
    except EngineStoppedError as error:
        if not lease.is_cut_off:
            status = error.status_code
            raise
        status = ModelSwappedError.status_code
        raise ModelSwappedError(f"{lease.slot.version} was swapped out and its drain deadline passed before this request finished; retry.") from error
    except BaseException as error:
        status = status_of(error)
        raise
    finally:
        lease.release()
        observation.finish(status)


def status_of(error: BaseException) -> int:
    """The status a request that ended with `error` counts as; 499: its client went away."""
    if isinstance(error, BatonError):
        return error.status_code
    return 499 if isinstance(error, (asyncio.CancelledError, GeneratorExit)) else 500


async def _collect(choices: AsyncIterator[ChoiceChunk], fmt, head: dict, num_choices: int, num_prompt_tokens: int, served: Served) -> dict:
    texts, reasons, num_completion_tokens = [""] * num_choices, [None] * num_choices, 0
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(num_choices)]
    prompt_logprobs: list[tuple[TokenLogprob, ...]] = [()] * num_choices
    token_ids: list[list[int]] = [[] for _ in range(num_choices)]
    tool_calls: list[tuple[ToolCall, ...]] = [()] * num_choices
    reasonings, tally, cached = [""] * num_choices, ReasoningTally(), CachedTokens(served.choices_per_prompt(num_choices))
    async with aclosing(choices) as stream:
        async for item in stream:
            texts[item.index] += item.chunk.text
            reasonings[item.index] += item.reasoning
            reasons[item.index] = item.chunk.finish_reason
            logprobs[item.index] += item.chunk.logprobs
            prompt_logprobs[item.index] += item.chunk.prompt_logprobs
            token_ids[item.index] += item.chunk.token_ids
            tool_calls[item.index] += item.tool_calls
            num_completion_tokens += item.chunk.num_tokens
            tally.count(item)
            cached.count(item)
    answers = [fmt.choice(i, texts[i], reasons[i], logprobs[i], tool_calls[i], reasonings[i]) | fmt.tokens.of_choice(token_ids[i]) for i in range(num_choices)]
    if fmt.prompt_per_choice:
        answers = [answer | fmt.tokens.of_prompt(served.prompt_of(i, num_choices), prompt_logprobs[i]) for i, answer in enumerate(answers)]
    else:
        head = head | fmt.tokens.of_prompt(served.prompts[0], prompt_logprobs[0])
    return {**head, "choices": answers, "usage": _usage(num_prompt_tokens, num_completion_tokens, tally.num_tokens, cached.num_tokens)}


_DONE = "data: [DONE]\n\n"
_NULL_USAGE, _NO_USAGE = {"usage": None}, {}  # never mutated: merged into each event's dict


@dataclass
class _UsagePolicy:
    """Rule: with include_usage every chunk carries `usage: null` and one last chunk with no
    choices carries the totals; with continuous_usage_stats every chunk carries the totals so far."""

    num_prompt_tokens: int
    include_usage: bool
    is_continuous: bool
    cached: CachedTokens = field(default_factory=CachedTokens)
    num_completion_tokens: int = 0
    reasoning: ReasoningTally = field(default_factory=ReasoningTally)

    def count(self, item: ChoiceChunk) -> None:
        self.num_completion_tokens += item.chunk.num_tokens
        self.reasoning.count(item)
        self.cached.count(item)

    def on_chunk(self) -> dict:
        if self.is_continuous:
            return {"usage": self.final()}
        return _NULL_USAGE if self.include_usage else _NO_USAGE

    def final(self) -> dict:
        return _usage(self.num_prompt_tokens, self.num_completion_tokens, self.reasoning.num_tokens, self.cached.num_tokens)


def _usage_policy(body, num_prompt_tokens: int, served: Served, num_choices: int) -> _UsagePolicy:
    return _UsagePolicy(num_prompt_tokens, body.include_usage, body.continuous_usage, CachedTokens(served.choices_per_prompt(num_choices)))


async def _replayed(items: list[ChoiceChunk]) -> AsyncIterator[ChoiceChunk]:
    for item in items:
        yield item


async def _sse(choices, fmt, head: dict, num_choices: int, usage: _UsagePolicy, served: Served):
    """SSE chunks, then `data: [DONE]`. With `return_token_ids` a choice's prompt token ids
    come first (chat: beside its opening delta; completions: in its first chunk), and each
    delta carries the ids of the tokens it adds."""
    for index in range(num_choices):
        if (opening := fmt.opening_delta(index)) is not None:
            yield _event({**head, "choices": [opening], **fmt.tokens.of_prompt(served.prompt_of(index, num_choices)), **usage.on_chunk()})
    unopened = set(range(num_choices)) if fmt.prompt_per_choice else set()
    try:
        async with aclosing(choices) as stream:
            async for item in stream:
                chunk = item.chunk
                usage.count(item)
                if chunk.text or chunk.logprobs or item.reasoning or (fmt.tokens.token_ids and chunk.token_ids):
                    delta = fmt.delta(item.index, chunk.text, None, chunk.logprobs, reasoning=item.reasoning)
                    delta |= fmt.tokens.of_choice(chunk.token_ids)  # in place: no copy of every token's delta
                    if item.index in unopened:
                        unopened.discard(item.index)
                        delta |= fmt.tokens.of_prompt(served.prompt_of(item.index, num_choices))
                    yield _event({**head, "choices": [delta], **usage.on_chunk()})
                if item.call_pieces:
                    yield _event({**head, "choices": [fmt.delta(item.index, "", None, (), [p.as_openai() for p in item.call_pieces])], **usage.on_chunk()})
                if chunk.finish_reason:
                    yield _event({**head, "choices": [fmt.delta(item.index, "", chunk.finish_reason)], **usage.on_chunk()})
    except Exception as error:  # headers are sent: the error can only travel in the stream
        yield _event(stream_error(error).to_body())
        return
    if usage.include_usage:
        yield _event({**head, "choices": [], "usage": usage.final()})
    yield _DONE


def stream_error(error: Exception) -> BatonError:
    if isinstance(error, BatonError):
        return error
    log.exception("generation failed mid-stream", exc_info=error)
    return EngineError("The generation failed; see the server log.")


def _usage(num_prompt_tokens: int, num_completion_tokens: int, num_reasoning_tokens: int = 0, num_cached_tokens: int = 0) -> dict:
    """OpenAI's usage; the prompt tokens the prefix cache held and the completion tokens
    spent thinking, where there were any (as vLLM's server writes them)."""
    usage = {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }
    if num_cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": num_cached_tokens}
    if num_reasoning_tokens:
        usage["completion_tokens_details"] = {"reasoning_tokens": num_reasoning_tokens}
    return usage


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
