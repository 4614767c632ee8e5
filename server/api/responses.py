"""OpenAI's Responses API (`POST /v1/responses`, and `GET`/`DELETE /v1/responses/{id}`): a
request is read as the chat completion it means and served by the same path (leases, tools,
structured output, limits), and the answer is written as a Response object, or as Responses
stream events.

Rules: an answer is kept (response_store.py) unless its request says `store: false` or the
server keeps none; `previous_response_id` continues a kept one: its input and output items
come before this request's input (its instructions do not, as OpenAI has it). An error
names the Responses field (`input`, `text.format`, `max_output_tokens`), not the chat field
it became. Output items come in the order the model wrote them: text opens a message item,
each call a function_call item.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict, Discriminator, Field, Tag, TypeAdapter

from models.errors import InvalidRequestError
from server.api.chat_fields import ChatFields, whole_answer
from server.api.generation import CachedTokens, ChoiceChunk
from server.api.openai_api import Served, admit, kept_in, owner_of, stream_error
from server.api.background import KEEP_EVENTS_S, BackgroundRuns, EventLog
from server.api.reasoning import ReasoningTally
from server.api.conversation_store import ConversationStore
from server.api.response_store import ResponseStore, StoredResponse
from server.api.schemas import ChatCompletionRequest, ReasoningEffort, Strict
from server.api.shapes import token_logprobs
from server.api.tools import ToolCall

router = APIRouter(prefix="/v1", dependencies=[Depends(admit)])


class ContentPart(Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None  # on output_text sent back: carried, not read
    logprobs: list | None = None


class _Item(Strict):
    """An input item; `id` and `status` come with items sent back from an earlier output."""

    id: str | None = None
    status: str | None = None


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str
    output: str


class ReasoningText(Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Item):
    """Thinking from an earlier answer, sent back: shown to the template with the assistant
    message after it (which may drop it, as Qwen3's does)."""

    type: Literal["reasoning"]
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: None = None  # baton encrypts nothing: only its own items come back

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.content or self.summary)


def _item_kind(item) -> str:
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_kind),
]
ITEMS = TypeAdapter(list[InputItem])  # kept items, read back


class FunctionTool(Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class NamedFunction(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the default; others ask for what no engine does


class ReasoningConfig(Strict):
    effort: ReasoningEffort | None = None  # as chat's reasoning_effort
    summary: None = None  # summaries of the thinking are not made: the thinking itself is the reasoning item
    generate_summary: None = None


class ConversationRef(Strict):
    id: str = Field(max_length=128)


class ResponsesRequest(Strict):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None  # unset: kept, as OpenAI has it, where the server keeps Responses
    previous_response_id: str | None = Field(None, max_length=128)
    conversation: Annotated[str, Field(max_length=128)] | ConversationRef | None = None  # answered in it: its items first, this answer's added (conversations.py)
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    priority: int = 0  # vLLM's, as chat's
    top_logprobs: int | None = Field(None, ge=0, le=20)  # alternatives per token, where logprobs are returned
    include: list[Literal["message.output_text.logprobs"]] | None = None  # each token's logprob in the output text
    truncation: Literal["disabled", "auto"] | None = None  # auto: the oldest turns go until the prompt fits (truncation.py)
    background: bool | None = None  # answered at once, generated in a task; read with GET (below)
    service_tier: Literal["auto", "default"] | None = None
    reasoning: ReasoningConfig | None = None

    def input_items(self) -> list[dict]:
        """The input as items, as they are kept: each with an id, a message's text as a part
        (what `GET /v1/responses/{id}/input_items` lists, and a follow-up reads back)."""
        return [as_kept_item(item) for item in self._given()]

    @property
    def wants_logprobs(self) -> bool:
        """Rule: the output text's logprobs are returned where `include` asks for them, or
        where `top_logprobs` is set (asking for alternatives asks for the tokens too)."""
        return "message.output_text.logprobs" in (self.include or ()) or self.top_logprobs is not None

    @property
    def conversation_id(self) -> str | None:
        return self.conversation.id if isinstance(self.conversation, ConversationRef) else self.conversation

    def _given(self) -> list:
        return [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input

    def as_chat(self, earlier: list[dict]) -> ChatCompletionRequest:
        """The chat completion this request means, after the `earlier` items of the response
        it continues, checked as any chat request is."""
        body = {
            "model": self.model,
            "messages": _messages(self.instructions, ITEMS.validate_python(earlier) + list(self._given())),
            "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": self.stream,
            "parallel_tool_calls": self.parallel_tool_calls,
            "user": self.user,
            "safety_identifier": self.safety_identifier,
            "prompt_cache_key": self.prompt_cache_key,
            "metadata": self.metadata,
            "reasoning_effort": self.reasoning.effort if self.reasoning else None,
            "priority": self.priority,
        }
        if self.wants_logprobs:
            body |= {"logprobs": True, "top_logprobs": self.top_logprobs or 0}
        if self.tools:
            body["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)} for tool in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}} if isinstance(self.tool_choice, NamedFunction) else self.tool_choice
        if self.text is not None and self.text.format is not None:
            body["response_format"] = _response_format(self.text.format)
        return FIELDS.chat_request(body)


_ID_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}


def as_kept_item(item) -> dict:
    """An input item as it is kept and listed: with an id, a message's text as a part."""
    kept = item.model_dump(exclude_none=True)
    kept.setdefault("id", _ID_PREFIXES[kept["type"]] + uuid.uuid4().hex)
    if kept["type"] == "message" and isinstance(kept["content"], str):
        kept["content"] = [{"type": "output_text" if kept["role"] == "assistant" else "input_text", "text": kept["content"]}]
    return kept


def item_page(items: list[dict], limit: int, order: str, after: str | None) -> dict:
    """One page of a list of items, OpenAI's cursor page: `limit` of them in `order` (`asc`:
    as they came), from the one after the item `after` names."""
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise InvalidRequestError(f"No item {after!r} is in this list.", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}


def _messages(instructions: str | None, items: list) -> list[dict]:
    """Instructions first, as a system message; each group of function calls in a row
    becomes one assistant message that calls them; each output, a tool message; reasoning
    goes with the assistant message that follows it."""
    messages = [{"role": "system", "content": instructions}] if instructions is not None else []
    reasoning = {}
    for item in items:
        if isinstance(item, ReasoningItem):
            reasoning = {"reasoning": item.text}
        elif isinstance(item, MessageItem):
            content = item.content if isinstance(item.content, str) else [{"type": "text", "text": part.text} for part in item.content]
            messages.append({"role": item.role, "content": content} | (reasoning if item.role == "assistant" else {}))
            reasoning = {}
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if messages and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]} | reasoning)
            reasoning = {}
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return messages


def _response_format(spec: TextFormat) -> dict:
    if spec.type != "json_schema":
        return {"type": spec.type}
    schema = {"name": spec.name, "description": spec.description, "schema": spec.json_schema, "strict": spec.strict}
    return {"type": "json_schema", "json_schema": {key: value for key, value in schema.items() if value is not None}}


# Chat fields, as the Responses fields they came from (chat_fields.py).
FIELDS = ChatFields(
    (
        (("response_format", "json_schema", "schema"), ("text", "format", "schema")),
        (("response_format", "json_schema"), ("text", "format")),
        (("response_format",), ("text", "format")),
        (("max_completion_tokens",), ("max_output_tokens",)),
        (("messages",), ("input",)),
    )
)


@router.post("/responses")
async def create_response(body: ResponsesRequest, request: Request):
    earlier = await _conversation_before(request, body)
    keeper = _keeper(request, body, earlier)
    if body.background:
        _check_background(keeper)
    shape = ResponseShape(body, keeper, request.state.background_runs)
    return await FIELDS.answer(request, body.as_chat(earlier), shape, truncate=body.truncation == "auto")


@router.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request, stream: bool = False, starting_after: int | None = Query(None, ge=0)):
    """A kept Response; with `stream`, a streamed background one's events again (after
    `starting_after`), then the rest as they come."""
    response = (await _kept_response(request, response_id)).response
    if not stream:
        return response
    if (events := request.state.background_runs.events_of(response_id)) is None:
        raise InvalidRequestError(_why_not_streamed(response), param="stream")
    return StreamingResponse(events.follow(starting_after), media_type="text/event-stream")


@router.get("/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str, request: Request, limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc", after: str | None = None
) -> dict:
    """The input items that led to a kept Response, those of the responses it continues included."""
    return item_page((await _kept_response(request, response_id)).input_items, limit, order, after)


@router.post("/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request) -> dict:
    """A background Response stops where it is, `cancelled`; one that ended is left as it ended."""
    if not (await _kept_response(request, response_id)).response.get("background"):
        raise InvalidRequestError("Only a background response (background: true) can be cancelled.")
    await request.state.background_runs.cancel(response_id)
    return (await _kept_response(request, response_id)).response


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict:
    await asyncio.to_thread(_store(request).delete, owner_of(request), response_id)
    return {"id": response_id, "object": "response", "deleted": True}


async def _conversation_before(request: Request, body: ResponsesRequest) -> list[dict]:
    """The items this answer follows: those of the kept response that `previous_response_id`
    continues, or of the `conversation` it answers in; none without either."""
    if body.previous_response_id is not None and body.conversation is not None:
        raise InvalidRequestError("A response continues either a previous response or a conversation, not both.", param="conversation")
    if body.conversation_id is not None:
        return await asyncio.to_thread(conversations_of(request, "conversation").items, owner_of(request), body.conversation_id, "conversation")
    if body.previous_response_id is not None:
        return (await _kept_response(request, body.previous_response_id, "previous_response_id")).conversation
    return []


async def _kept_response(request: Request, response_id: str, param: str | None = None) -> StoredResponse:
    """A kept Response of this request's key; an error (naming `param`, where a request field
    named it) where there is none."""
    return await asyncio.to_thread(_store(request, param).get, owner_of(request), response_id, param)


def _keeper(request: Request, body: ResponsesRequest, earlier: list[dict]) -> Keeper | None:
    """Rule: an answer is kept unless its request says `store: false` (OpenAI's default is to
    keep), or the server keeps none; one in a conversation adds its items there either way."""
    is_stored = not (body.store is False or (request.state.responses is None and not body.store))
    if not is_stored and body.conversation_id is None:
        return None
    new_items = body.input_items()
    conversation = None
    if body.conversation_id is not None:
        if repeated := sorted({item["id"] for item in earlier} & {item["id"] for item in new_items}):  # refused before generating, not after
            raise InvalidRequestError(f"Each item of a conversation has an id of its own; {', '.join(repeated)} is in {body.conversation_id} already.", param="input")
        conversation = Conversation(request.state.conversations, body.conversation_id, new_items)
    return Keeper(owner_of(request), earlier + new_items, _store(request, "store") if is_stored else None, conversation)


def _check_background(keeper: Keeper | None) -> None:
    """A background Response is read with GET as it goes, so it must be kept."""
    if keeper is None or keeper.store is None:
        raise InvalidRequestError("A background response is read back with GET /v1/responses/{id}: it must be kept (store cannot be false here).", param="store")


def conversations_of(request: Request, param: str | None = None) -> ConversationStore:
    return kept_in(request.state.conversations, "conversations", "conversation_not_found", param)


def _why_not_streamed(response: dict) -> str:
    if not response.get("background"):
        return "Only a background response created with stream: true can be streamed again; GET it without stream."
    return (
        f"The events of {response['id']} are not kept: it was not streamed, or it ended over "
        f"{KEEP_EVENTS_S / 60:g} minutes ago, or the server restarted since. GET it without stream."
    )


def _store(request: Request, param: str | None = None) -> ResponseStore:
    return kept_in(request.state.responses, "responses", "response_not_found", param)


@dataclass(frozen=True)
class Conversation:
    """The conversation an answer is in, and the input items it adds there before its output."""

    store: ConversationStore
    id: str
    new_items: list[dict]


@dataclass(frozen=True)
class Keeper:
    """Where an answer is kept: in the `store` (unless its request said `store: false`) with
    every input item that led to it, and in its `conversation`, where it adds its input and
    output once it has ended well (not failed, nor cancelled)."""

    owner: str
    input_items: list[dict]
    store: ResponseStore | None = None
    conversation: Conversation | None = None

    async def keep(self, response: dict) -> None:
        if self.store is not None:
            await asyncio.to_thread(self.store.keep, self.owner, response, self.input_items)
        if self.conversation is not None and response["status"] in ("completed", "incomplete"):
            await asyncio.to_thread(self.conversation.store.add, self.owner, self.conversation.id, self.conversation.new_items + response["output"])


@dataclass(frozen=True)
class ResponseShape:
    """How a Responses answer is written: whole (`collect`), as events (`events`), or at once
    while `runs` generates it (`in_background`); the whole answer is kept where `keeper`
    says, before it is sent."""

    request: ResponsesRequest
    keeper: Keeper | None = None
    runs: BackgroundRuns | None = None
    response_id: str = field(default_factory=lambda: "resp_" + uuid.uuid4().hex)
    created_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def runs_in_background(self) -> bool:
        return bool(self.request.background)

    def head(self, served: Served) -> dict:
        text_format = self.request.text.format.model_dump(by_alias=True, exclude_none=True) if self.request.text and self.request.text.format else {"type": "text"}
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "model": served.model,
            "instructions": self.request.instructions,
            "max_output_tokens": self.request.max_output_tokens,
            "temperature": served.sampling.temperature,  # as applied: the request's, else the version's default
            "top_p": served.sampling.top_p,
            "top_logprobs": self.request.top_logprobs,
            "tools": [tool.model_dump(exclude_none=True) for tool in self.request.tools or []],
            "tool_choice": self.request.tool_choice.model_dump() if isinstance(self.request.tool_choice, NamedFunction) else self.request.tool_choice or "auto",
            "parallel_tool_calls": self.request.parallel_tool_calls is not False,
            "reasoning": {"effort": self.request.reasoning.effort, "summary": None} if self.request.reasoning else None,
            "text": {"format": text_format},
            "store": self.keeper is not None and self.keeper.store is not None,
            "background": self.runs_in_background,
            "previous_response_id": self.request.previous_response_id,
            "conversation": {"id": self.request.conversation_id} if self.request.conversation_id else None,
            "truncation": self.request.truncation or "disabled",
            "metadata": self.request.metadata or {},
            "user": self.request.user,
            "safety_identifier": self.request.safety_identifier,
            "prompt_cache_key": self.request.prompt_cache_key,
            "output": [],
        }

    async def collect(self, choices: AsyncIterator[ChoiceChunk], served: Served, num_choices: int, num_prompt_tokens: int) -> dict:
        answer = _Answer(self.head(served), num_prompt_tokens, self.request.wants_logprobs)
        logprobs: list[dict] = []

        def count(item: ChoiceChunk) -> None:
            answer.count(item)
            logprobs.extend(answer.text_logprobs(item))

        whole = await whole_answer(choices, count)
        if whole.reasoning:
            answer.output.append(_reasoning(whole.reasoning, "completed"))
        if whole.text:
            answer.output.append(_message(whole.text, "completed", logprobs))
        answer.output += [_function_call(call, "completed") for call in whole.calls]
        final = answer.final()
        if self.keeper is not None:
            await self.keeper.keep(final)
        return final

    async def in_background(self, choices: AsyncIterator[ChoiceChunk], served: Served, num_choices: int, num_prompt_tokens: int) -> dict:
        """The Response as it starts, kept; the generation goes on in a task that keeps it
        again as it ends: completed (or incomplete), failed, or cancelled."""
        started = {**self.head(served), "status": "in_progress"}
        await self.keeper.keep(started)
        self.runs.start(self.response_id, self._finish(choices, served, num_choices, num_prompt_tokens, started))
        # Rule: the run takes its first step before anything can cancel it, so that from then
        # on the generation's own end (openai_api._on_lease) returns the lease, however it ends.
        await asyncio.sleep(0)
        return started

    async def _finish(self, choices, served: Served, num_choices: int, num_prompt_tokens: int, started: dict) -> None:
        try:
            await self.collect(choices, served, num_choices, num_prompt_tokens)
        except asyncio.CancelledError:  # the generation was closed on the way out: stopped in the engine
            await self.keeper.keep({**started, "status": "cancelled"})
        except Exception as error:
            await self.keeper.keep(_failed(started, error))

    async def streamed_in_background(self, choices: AsyncIterator[ChoiceChunk], served: Served, num_choices: int, usage) -> AsyncIterator[str]:
        """The events of a run that goes on if the client leaves: kept as it starts, followed
        from its event log, which `GET /v1/responses/{id}?stream=true` follows again."""
        started = {**self.head(served), "status": "in_progress"}
        await self.keeper.keep(started)
        log = EventLog()
        self.runs.start(self.response_id, self._write(log, self.events(choices, served, num_choices, usage), started), log)
        await asyncio.sleep(0)  # as in `in_background`: the run's first step before any cancel
        return log.follow()

    async def _write(self, log: EventLog, events: AsyncIterator[str], started: dict) -> None:
        """`events` into `log`; a cancelled run ends its log there, kept `cancelled`."""
        try:
            async with aclosing(events):
                async for event in events:
                    log.append(event)
        except asyncio.CancelledError:
            await self.keeper.keep({**started, "status": "cancelled"})

    async def events(self, choices: AsyncIterator[ChoiceChunk], served: Served, num_choices: int, usage) -> AsyncIterator[str]:
        answer = _Answer(self.head(served), usage.num_prompt_tokens, self.request.wants_logprobs)
        events = _Events()
        yield events.send("response.created", response=answer.response("in_progress"))
        yield events.send("response.in_progress", response=answer.response("in_progress"))
        try:
            async with aclosing(choices) as stream:
                async for item in stream:
                    answer.count(item)
                    for event in answer.stream(item):
                        yield events.send(**event)
            last_events, final = answer.close_item(), answer.final()
            if self.keeper is not None:
                await self.keeper.keep(final)
        except Exception as error:  # headers are sent: the error can only travel in the stream
            failure = stream_error(error)
            if self.keeper is not None:
                await self.keeper.keep(_failed(answer.response("in_progress"), error))
            yield events.send("error", code=failure.code, message=failure.message, param=FIELDS.param(failure.param))
            return
        for event in last_events:
            yield events.send(**event)
        yield events.send("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)


@dataclass
class _Events:
    sequence_number: int = 0

    def send(self, type: str, **fields) -> str:
        payload = {"type": type, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {type}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass
class _Answer:
    """One answer as it is written: its output items so far, the one open, and the counts."""

    head: dict
    num_prompt_tokens: int
    wants_logprobs: bool = False
    num_completion_tokens: int = 0
    reasoning: ReasoningTally = field(default_factory=ReasoningTally)
    cached: CachedTokens = field(default_factory=CachedTokens)
    finish_reason: str | None = None
    output: list[dict] = field(default_factory=list)
    open_item: dict | None = None  # events: the item being streamed

    def count(self, item: ChoiceChunk) -> None:
        self.num_completion_tokens += item.chunk.num_tokens
        self.reasoning.count(item)
        self.cached.count(item)
        self.finish_reason = item.chunk.finish_reason or self.finish_reason

    def text_logprobs(self, item: ChoiceChunk) -> list[dict]:
        """The logprobs of a chunk's output text, where asked for (a chunk of reasoning, or
        of a call's held text, adds none)."""
        return token_logprobs(item.chunk.logprobs) if self.wants_logprobs and item.chunk.text else []

    def stream(self, item: ChoiceChunk) -> list[dict]:
        """The events one chunk makes: reasoning deltas into a reasoning item, text deltas into
        a message item, call pieces into function_call items; a new kind of output closes the
        item open before it."""
        events = []
        if item.reasoning:
            if self.open_item is None or self.open_item["type"] != "reasoning":
                events += self.close_item() + self._open(_reasoning("", "in_progress"))
            self.open_item["content"][0]["text"] += item.reasoning
            events.append({"type": "response.reasoning_text.delta", **self._where(), "content_index": 0, "delta": item.reasoning})
        if item.chunk.text:
            if self.open_item is None or self.open_item["type"] != "message":
                events += self.close_item() + self._open(_message("", "in_progress"))
                events.append({"type": "response.content_part.added", **self._where(), "content_index": 0, "part": _text_part("")})
            part = self.open_item["content"][0]
            part["text"] += item.chunk.text
            logprobs = self.text_logprobs(item)
            part["logprobs"] += logprobs
            events.append({"type": "response.output_text.delta", **self._where(), "content_index": 0, "delta": item.chunk.text, "logprobs": logprobs})
        for piece in item.call_pieces:
            if piece.id is not None:
                events += self.close_item() + self._open(_function_call(ToolCall(piece.id, piece.name, ""), "in_progress"))
            if piece.arguments and self.open_item is not None and self.open_item["type"] == "function_call":
                self.open_item["arguments"] += piece.arguments
                events.append({"type": "response.function_call_arguments.delta", **self._where(), "delta": piece.arguments})
        return events

    def close_item(self) -> list[dict]:
        item, self.open_item = self.open_item, None
        if item is None:
            return []
        item["status"] = "completed"
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        if item["type"] == "message":
            part = item["content"][0]
            done = [
                {"type": "response.output_text.done", **where, "content_index": 0, "text": part["text"], "logprobs": part["logprobs"]},
                {"type": "response.content_part.done", **where, "content_index": 0, "part": part},
            ]
        elif item["type"] == "reasoning":
            done = [{"type": "response.reasoning_text.done", **where, "content_index": 0, "text": item["content"][0]["text"]}]
        else:
            done = [{"type": "response.function_call_arguments.done", **where, "name": item["name"], "arguments": item["arguments"]}]
        return done + [{"type": "response.output_item.done", "output_index": len(self.output) - 1, "item": item}]

    def _open(self, item: dict) -> list[dict]:
        self.output.append(item)
        self.open_item = item
        shown = {**item, "content": []} if item["type"] in ("message", "reasoning") else dict(item)
        return [{"type": "response.output_item.added", "output_index": len(self.output) - 1, "item": shown}]

    def _where(self) -> dict:
        return {"item_id": self.open_item["id"], "output_index": len(self.output) - 1}

    def response(self, status: str) -> dict:
        return {**self.head, "status": status, "output": self.output}

    def final(self) -> dict:
        """`incomplete` where the answer was cut by max_output_tokens, as OpenAI says it."""
        is_cut = self.finish_reason == "length"
        usage = {
            "input_tokens": self.num_prompt_tokens,
            "input_tokens_details": {"cached_tokens": self.cached.num_tokens},
            "output_tokens": self.num_completion_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning.num_tokens},
            "total_tokens": self.num_prompt_tokens + self.num_completion_tokens,
        }
        details = {"reason": "max_output_tokens"} if is_cut else None
        return {**self.response("incomplete" if is_cut else "completed"), "incomplete_details": details, "usage": usage}


def _failed(response: dict, error: Exception) -> dict:
    failure = stream_error(error)
    return {**response, "status": "failed", "error": {"code": failure.code or failure.error_type, "message": failure.message}}


def _message(text: str, status: str, logprobs: list[dict] | None = None) -> dict:
    return {"type": "message", "id": "msg_" + uuid.uuid4().hex, "status": status, "role": "assistant", "content": [_text_part(text, logprobs)]}


def _reasoning(text: str, status: str) -> dict:
    return {"type": "reasoning", "id": "rs_" + uuid.uuid4().hex, "status": status, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _text_part(text: str, logprobs: list[dict] | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(logprobs or [])}


def _function_call(call: ToolCall, status: str) -> dict:
    return {"type": "function_call", "id": "fc_" + uuid.uuid4().hex, "call_id": call.id, "name": call.name, "arguments": call.arguments, "status": status}
