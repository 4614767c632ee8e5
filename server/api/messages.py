"""Anthropic's Messages API (`POST /v1/messages`, and `/v1/messages/count_tokens`), as vLLM's
server serves it: a request is read as the chat completion it means and served by the same
path (leases, tools, reasoning, structured output, limits), and the answer is written as a
Message, or as Anthropic's stream events. Clients built on Anthropic's SDK reach any version.

Rules: content blocks baton cannot show a model (images; PDF, URL and file documents) are
refused, never dropped; a text document is shown as text, its title and context first;
`cache_control` and `citations` are hints about Anthropic's own service and change
nothing; a thinking budget (`thinking.budget_tokens`) is held as chat's
`thinking_token_budget`, as vLLM's server holds it, where the engine can (elsewhere the
request is served without it: its clients send one with every request that thinks), and
`thinking: disabled` turns a reasoning template's thinking off, as vLLM does. Errors are
Anthropic-shaped (`{"type": "error", "error": {...}}`, app.py) and name the Messages field,
not the chat field it became. Content blocks come in the order the model wrote them:
thinking, then text, then tool calls.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Discriminator, Field, Tag

from server.api.error_bodies import anthropic_error
from server.api.chat_fields import ChatFields, whole_answer
from server.api.generation import CachedTokens, ChoiceChunk
from server.api.openai_api import Served, admit, route_request, served_headers, stream_error
from server.api.schemas import ChatCompletionRequest, ReasoningEffort, Strict

router = APIRouter(prefix="/v1", dependencies=[Depends(admit)])

class _Block(Strict):
    cache_control: dict | None = None  # Anthropic's prompt caching: a hint, changes nothing here


class TextBlock(_Block):
    type: Literal["text"]
    text: str
    citations: list | None = None


class ThinkingBlock(_Block):
    """Thinking from an earlier answer, sent back: shown to the template with its message."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None  # baton signs nothing: its own blocks come back as they left


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: str  # Anthropic's encrypted thinking: no model here can read it, so it is left out


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None  # the text says what went wrong; a template has no place for the flag

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(block.text for block in self.content or [])


def _block_kind(block) -> str | None:
    return block.get("type") if isinstance(block, dict) else getattr(block, "type", None)


class PlainTextSource(Strict):
    type: Literal["text"]
    media_type: Literal["text/plain"] = "text/plain"
    data: str

    @property
    def text(self) -> str:
        return self.data


class BlocksSource(Strict):
    type: Literal["content"]
    content: str | list[TextBlock]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(block.text for block in self.content)


class DocumentBlock(_Block):
    """A text document (Anthropic's `text` or `content` source), shown to the model as text:
    its title, its context, then its text, a blank line apart and before what follows. A
    PDF, a URL or a file id is refused: baton fetches and parses nothing."""

    type: Literal["document"]
    source: Annotated[
        Annotated[PlainTextSource, Tag("text")] | Annotated[BlocksSource, Tag("content")],
        Discriminator(_block_kind, custom_error_type="invalid_source", custom_error_message="a document's source is its text (type text) or text blocks (type content); PDFs, URLs and files are not read here"),
    ]
    title: str | None = None
    context: str | None = None
    citations: dict | None = None  # none are made: the answer is plain text

    @property
    def text(self) -> str:
        return "".join(part + "\n\n" for part in (self.title, self.context, self.source.text) if part)


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[DocumentBlock, Tag("document")],
    Discriminator(_block_kind, custom_error_type="invalid_block", custom_error_message="a content block is text, document, thinking, redacted_thinking, tool_use or tool_result; images are not read here"),
]


class Message(Strict):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Tool(Strict):
    name: str
    description: str | None = None
    input_schema: dict
    type: Literal["custom"] | None = None
    cache_control: dict | None = None


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1024)
    display: Literal["summarized", "omitted", "updates"] | None = None  # accepted: the thinking is always returned, as vLLM does


class OutputFormat(Strict):
    type: Literal["json_schema"]
    json_schema: dict = Field(alias="schema")


class OutputConfig(Strict):
    effort: ReasoningEffort | None = None
    format: OutputFormat | None = None


class Metadata(Strict):
    user_id: str | None = None  # keeps a user on one side of a canary, as chat's `user`


class _Conversation(Strict):
    """What both routes read: the conversation, the tools and the thinking settings."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None

    def chat_fields(self) -> dict:
        body = {"model": self.model, "messages": _chat_messages(self.system, self.messages), "reasoning_effort": _effort(self.thinking, self.output_config)}
        if self.thinking is not None and self.thinking.type == "enabled":
            body["thinking_token_budget"] = self.thinking.budget_tokens  # enforced, as vLLM's server does
        if self.tools:
            body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}} for t in self.tools]
        if self.tool_choice is not None:
            choice = self.tool_choice
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}} if choice.type == "tool" else {"auto": "auto", "any": "required", "none": "none"}[choice.type]
            body["parallel_tool_calls"] = False if choice.disable_parallel_tool_use else None
        if self.output_config is not None and self.output_config.format is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": self.output_config.format.json_schema}}
        return body

    def as_chat(self, **fields) -> ChatCompletionRequest:
        """The chat completion this request means, checked as any chat request is; an error
        names the Messages field it came from."""
        return FIELDS.chat_request(self.chat_fields() | fields).with_thinking_budget_as_target()


class MessagesRequest(_Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here: changes nothing
    cache_control: dict | None = None  # Anthropic's automatic prompt caching: a hint (vLLM caches prefixes by itself)

    def as_chat(self) -> ChatCompletionRequest:
        user = self.metadata.user_id if self.metadata else None
        return super().as_chat(max_completion_tokens=self.max_tokens, stop=self.stop_sequences, stream=self.stream, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, user=user)


class CountTokensRequest(_Conversation):
    pass


def _effort(thinking: Thinking | None, output: OutputConfig | None) -> str | None:
    """vLLM's reading: thinking disabled is reasoning_effort none; otherwise output_config's effort."""
    if thinking is not None and thinking.type == "disabled":
        return "none"
    return output.effort if output is not None else None


def _chat_messages(system: str | list[TextBlock] | None, messages: list[Message]) -> list[dict]:
    """System first; a user message's tool results become tool messages (before its text),
    an assistant message's tool_use blocks its tool_calls and its thinking its reasoning."""
    chat = [{"role": "system", "content": system if isinstance(system, str) else "\n".join(b.text for b in system)}] if system else []
    for message in messages:
        blocks = [TextBlock(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        texts = [{"type": "text", "text": b.text} for b in blocks if isinstance(b, TextBlock | DocumentBlock)]
        if message.role == "user":
            chat += [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text} for b in blocks if isinstance(b, ToolResultBlock)]
            chat += [{"role": "user", "content": texts}] if texts else []
            continue
        calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}} for b in blocks if isinstance(b, ToolUseBlock)]
        reasoning = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
        reply = {"role": "assistant", "content": texts or (None if calls else "")}
        chat.append(reply | ({"tool_calls": calls} if calls else {}) | ({"reasoning": reasoning} if reasoning else {}))
    return chat


# Chat fields, as the Messages fields they came from (chat_fields.py).
FIELDS = ChatFields(
    (
        (("max_completion_tokens",), ("max_tokens",)),
        (("stop",), ("stop_sequences",)),
        (("response_format",), ("output_config", "format")),
        (("reasoning_effort",), ("output_config", "effort")),
        (("thinking_token_budget",), ("thinking", "budget_tokens")),
        (("user",), ("metadata", "user_id")),
        (("parallel_tool_calls",), ("tool_choice",)),
        (("messages",), ("messages",)),  # tool results become messages of their own
    ),
    parameters="input_schema",
)


@router.post("/messages")
async def create_message(body: MessagesRequest, request: Request):
    return await FIELDS.answer(request, body.as_chat(), MessageShape())


@router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> JSONResponse:
    """The prompt's tokens, as the same request's usage counts them: `input_tokens`, plus
    `cache_read_input_tokens` where the prefix cache held some."""
    chat = body.as_chat()
    lease = await request.state.router.lease_tokenizer(route_request(request, chat.model))
    try:
        tools = chat.tool_plan.template_tools() if chat.tool_plan else None
        messages = [m.as_template_input() for m in chat.messages]
        tokens = await asyncio.to_thread(lease.engine.tokenize_chat, messages, tools, chat.template_kwargs)  # off the loop, as for generation
        return JSONResponse({"input_tokens": len(tokens)}, headers=served_headers(lease))
    finally:
        lease.release()


@dataclass(frozen=True)
class MessageShape:
    """How a Messages answer is written: whole (`collect`) or as events (`events`)."""

    runs_in_background = False

    async def collect(self, choices: AsyncIterator[ChoiceChunk], served: Served, num_choices: int, num_prompt_tokens: int) -> dict:
        answer = _Answer(served.model, num_prompt_tokens)
        whole = await whole_answer(choices, answer.count)
        thinking = [{"type": "thinking", "thinking": whole.reasoning, "signature": ""}] if whole.reasoning else []
        said = [{"type": "text", "text": whole.text}] if whole.text else []
        return answer.message(thinking + said + [_tool_use(call.id, call.name, call.arguments) for call in whole.calls])

    async def events(self, choices: AsyncIterator[ChoiceChunk], served: Served, num_choices: int, usage) -> AsyncIterator[str]:
        answer = _Answer(served.model, usage.num_prompt_tokens)
        yield _event("message_start", message={**answer.message([]), "stop_reason": None, "stop_sequence": None, "usage": answer.usage(0)})
        yield _event("ping")  # as Anthropic's API sends one after the start (clients skip it)
        try:
            async with aclosing(choices) as stream:
                async for item in stream:
                    for event in answer.take(item):
                        yield _event(**event)
        except Exception as error:  # headers are sent: the error can only travel in the stream
            failure = stream_error(error)
            yield _event("error", error=anthropic_error(failure, failure.status_code))
            return
        for event in answer.close_block():
            yield _event(**event)
        final = answer.message([])
        yield _event("message_delta", delta={"stop_reason": final["stop_reason"], "stop_sequence": final["stop_sequence"]}, usage=answer.usage(answer.num_output_tokens))
        yield _event("message_stop")


def _event(type: str, **fields) -> str:
    return f"event: {type}\ndata: {json.dumps({'type': type, **fields}, ensure_ascii=False)}\n\n"


@dataclass
class _Answer:
    """One answer as it is written: its content blocks so far, the one open, and the counts."""

    model: str
    num_input_tokens: int
    num_output_tokens: int = 0
    content: list[dict] = field(default_factory=list)
    is_open: bool = False  # the last block still takes deltas
    finish_reason: str | None = None
    stop_sequence: str | None = None
    cached: CachedTokens = field(default_factory=CachedTokens)
    id: str = field(default_factory=lambda: "msg_" + uuid.uuid4().hex)

    def count(self, item: ChoiceChunk) -> None:
        self.num_output_tokens += item.chunk.num_tokens
        self.cached.count(item)
        self.finish_reason = item.chunk.finish_reason or self.finish_reason
        self.stop_sequence = item.chunk.stop_sequence or self.stop_sequence

    def take(self, item: ChoiceChunk) -> list[dict]:
        """The events one chunk makes: a new kind of output closes the block open before it."""
        self.count(item)
        events = []
        if item.reasoning:
            events += self._into("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self.content[-1]["thinking"] += item.reasoning
            events.append(self._delta({"type": "thinking_delta", "thinking": item.reasoning}))
        if item.chunk.text:
            events += self._into("text", {"type": "text", "text": ""})
            self.content[-1]["text"] += item.chunk.text
            events.append(self._delta({"type": "text_delta", "text": item.chunk.text}))
        for piece in item.call_pieces:
            if piece.id is not None:
                events += self.close_block() + self._open(_tool_use(piece.id, piece.name, ""))
            if piece.arguments and self.is_open and self.content[-1]["type"] == "tool_use":
                events.append(self._delta({"type": "input_json_delta", "partial_json": piece.arguments}))
        return events

    def _into(self, kind: str, empty: dict) -> list[dict]:
        if self.is_open and self.content[-1]["type"] == kind:
            return []
        return self.close_block() + self._open(empty)

    def _open(self, block: dict) -> list[dict]:
        self.content.append(block)
        self.is_open = True
        return [{"type": "content_block_start", "index": len(self.content) - 1, "content_block": dict(block)}]  # as opened: the deltas follow

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta}

    def close_block(self) -> list[dict]:
        if not self.is_open:
            return []
        self.is_open = False
        return [{"type": "content_block_stop", "index": len(self.content) - 1}]

    def usage(self, num_output_tokens: int) -> dict:
        """Anthropic's: `input_tokens` are those the prefix cache did not hold (as vLLM's
        server counts them); those it held are `cache_read_input_tokens`, where there were any."""
        usage = {"input_tokens": self.num_input_tokens - self.cached.num_tokens, "output_tokens": num_output_tokens}
        return usage | ({"cache_read_input_tokens": self.cached.num_tokens} if self.cached.num_tokens else {})

    def message(self, content: list[dict]) -> dict:
        stop_reason = self._stop_reason()
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": self.stop_sequence if stop_reason == "stop_sequence" else None,
            "usage": self.usage(self.num_output_tokens),
        }

    def _stop_reason(self) -> str | None:
        """Anthropic's reading of how the answer ended: a cut by max_tokens wins; then a call."""
        if self.finish_reason == "length":
            return "max_tokens"
        if self.finish_reason == "tool_calls":
            return "tool_use"
        return "stop_sequence" if self.stop_sequence is not None else "end_turn" if self.finish_reason else None


def _tool_use(call_id: str, name: str, arguments: str) -> dict:
    """A call as a tool_use block: its input is the arguments' JSON object (`{}` while they stream)."""
    try:
        given = json.loads(arguments or "{}")
    except ValueError:
        given = {}
    return {"type": "tool_use", "id": call_id, "name": name, "input": given if isinstance(given, dict) else {}}
