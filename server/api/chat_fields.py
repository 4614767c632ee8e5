"""Another API's request served as the chat completion it means (OpenAI's Responses API,
Anthropic's Messages API): the chat request is checked as any chat request is, and every
error names the field as the caller wrote it, not the chat field it became.

Rule: a chat field's path is renamed by the first prefix in `renames` that matches it; under
`messages` no index is kept (the other API's items and the chat messages do not line up one
to one); under `tools.N.function` the `function` level is dropped and `parameters` takes the
other API's name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from models.errors import BatonError
from server.api.generation import ChoiceChunk
from server.api.openai_api import AnswerShape, answer_chat
from server.api.schemas import ChatCompletionRequest
from server.api.tools import ToolCall

Path = tuple[str, ...]


@dataclass(frozen=True)
class ChatFields:
    renames: tuple[tuple[Path, Path], ...]  # (chat prefix, the other API's)
    parameters: str = "parameters"  # what a tool's JSON schema is called there

    def chat_request(self, body: dict) -> ChatCompletionRequest:
        """`body` (None values left out) checked as a chat completion."""
        try:
            return ChatCompletionRequest.model_validate({key: value for key, value in body.items() if value is not None})
        except ValidationError as error:
            raise RequestValidationError([{**problem, "loc": ("body", *self.loc(problem["loc"]))} for problem in error.errors()]) from error

    async def answer(self, request: Request, chat: ChatCompletionRequest, shape: AnswerShape, truncate: bool = False):
        try:
            return await answer_chat(request, chat, shape, truncate)
        except BatonError as error:
            error.param = self.param(error.param)
            raise

    def loc(self, loc: tuple) -> tuple:
        loc = tuple(loc)
        if loc[:1] == ("tools",) and loc[2:3] == ("function",):
            return loc[:2] + tuple(self.parameters if part == "parameters" else part for part in loc[3:])
        for chat, theirs in self.renames:
            if loc[: len(chat)] == chat:
                return theirs + (loc[len(chat) :] if chat != ("messages",) else ())
        return loc

    def param(self, param: str | None) -> str | None:
        return ".".join(str(part) for part in self.loc(tuple(param.split(".")))) if param else param


@dataclass
class WholeAnswer:
    """One choice's output, gathered: its thinking, its text and its calls."""

    reasoning: str = ""
    text: str = ""
    calls: list[ToolCall] = field(default_factory=list)


async def whole_answer(choices: AsyncIterator[ChoiceChunk], count: Callable[[ChoiceChunk], None]) -> WholeAnswer:
    """Every chunk gathered (and shown to `count` as it comes), for an answer sent whole."""
    whole = WholeAnswer()
    async with aclosing(choices) as stream:
        async for item in stream:
            count(item)
            whole.reasoning += item.reasoning
            whole.text += item.chunk.text
            whole.calls += item.tool_calls
    return whole
