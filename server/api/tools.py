"""Tool calls: how a chat request's tools shape its generation, and how the output is read
back into OpenAI's `tool_calls`. Pure functions and small readers, no engine, no I/O.

  tool_choice   generation                                  output read as
  none          free text, tools not shown to the template  text
  auto          free text                                   text and any `<tool_call>{...}</tool_call>` blocks (Hermes format)
  required      JSON: a list of {"name", "arguments"}        those calls
  {function}    JSON: that function's arguments              one call of it

`required` and a named function are forced through structured output, so they work on any
model; `auto` relies on the model writing the Hermes format (what Qwen and Hermes models
write, and what baton asks for where a chat template cannot show tools itself).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from server.engines.base import JsonFormat
from server.engines.detokenizer import held_back_length

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict  # a JSON schema of the arguments object

    def as_tool(self) -> dict:
        """OpenAI's tool shape, which chat templates take as `tools`."""
        described = {"description": self.description} if self.description else {}
        return {"type": "function", "function": {"name": self.name, **described, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def new_call(name: str, arguments: object) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall("call_" + uuid.uuid4().hex[:24], name, text)


@dataclass(frozen=True)
class ToolPlan:
    functions: tuple[Function, ...]
    choice: str  # "auto", "required", or the name of the function that must be called

    def template_tools(self) -> list[dict]:
        return [f.as_tool() for f in self.functions]

    def json_format(self) -> JsonFormat | None:
        """The structured output that forces a call; None where the model chooses."""
        if self.choice == "auto":
            return None
        if self.choice == "required":
            return JsonFormat(json.dumps(calls_schema(self.functions)))
        return JsonFormat(json.dumps(self._function(self.choice).parameters))

    def reader(self) -> OutputReader:
        if self.choice == "auto":
            return HermesReader()
        if self.choice == "required":
            return CallListReader()
        return ArgumentsReader(self.choice)

    def _function(self, name: str) -> Function:
        return next(f for f in self.functions if f.name == name)


def calls_schema(functions: tuple[Function, ...]) -> dict:
    """A non-empty list of calls, each naming one of `functions` with valid arguments."""
    one_of = [
        {"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters}, "required": ["name", "arguments"], "additionalProperties": False}
        for f in functions
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}


@dataclass(frozen=True)
class ToolCallPiece:
    """Part of a call, streamed while it is generated: the first piece of a call names it."""

    index: int  # the call's place among the choice's calls
    arguments: str
    id: str | None = None
    name: str | None = None

    def as_openai(self) -> dict:
        head = {"id": self.id, "type": "function"} if self.id else {}
        function = {"name": self.name} if self.name else {}
        return {"index": self.index, **head, "function": {**function, "arguments": self.arguments}}


class OutputReader:
    """Reads one choice's text as it streams: `feed` returns the text that is content and
    may be sent now; `finish` returns the content held back and the calls found."""

    def feed(self, text: str) -> str:
        raise NotImplementedError

    def pieces(self) -> list[ToolCallPiece]:
        """Call pieces ready to stream since the last look; readers that read calls only
        at the end have none."""
        return []

    def finish(self) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError


class ArgumentsReader(OutputReader):
    """The whole output is the named function's arguments, streamed as they come. Output
    cut short (by max_tokens) is still the call, with the arguments so far, as OpenAI does."""

    def __init__(self, name: str):
        self._call = new_call(name, "")
        self._text, self._num_streamed = "", 0

    def feed(self, text: str) -> str:
        self._text += text
        return ""

    def pieces(self) -> list[ToolCallPiece]:
        piece = self._text[self._num_streamed :]
        if not piece and self._num_streamed:
            return []
        is_first = self._num_streamed == 0
        self._num_streamed = len(self._text)
        return [ToolCallPiece(0, piece, self._call.id if is_first else None, self._call.name if is_first else None)]

    def finish(self) -> tuple[str, list[ToolCall]]:
        return "", [ToolCall(self._call.id, self._call.name, self._text)]


class CallListReader(OutputReader):
    """The whole output is a JSON list of {"name", "arguments"}. Output cut short (by
    max_tokens) does not parse: it is returned as content, with no calls."""

    def __init__(self):
        self._text = ""

    def feed(self, text: str) -> str:
        self._text += text
        return ""

    def finish(self) -> tuple[str, list[ToolCall]]:
        try:
            calls = json.loads(self._text)
            return "", [new_call(call["name"], call["arguments"]) for call in calls]
        except (ValueError, TypeError, KeyError):
            return self._text, []


class HermesReader(OutputReader):
    """Content until a `<tool_call>` tag; from there on, held back and read at the end.
    Text that could be the start of the tag is held until it is known not to be."""

    def __init__(self):
        self._text, self._num_sent, self._in_calls = "", 0, False

    def feed(self, text: str) -> str:
        self._text += text
        if self._in_calls:
            return ""
        start = self._text.find(TOOL_CALL_OPEN, self._num_sent)
        if start != -1:
            self._in_calls = True
            return self._take(start)
        return self._take(len(self._text) - held_back_length(self._text, (TOOL_CALL_OPEN,)))

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest, calls = self._text[self._num_sent :], []
        for block in _TOOL_CALL_BLOCK.findall(rest):
            try:
                call = json.loads(block)
                calls.append(new_call(call["name"], call.get("arguments", call.get("parameters", {}))))
            except (ValueError, TypeError, KeyError):
                return rest, []  # not a call after all: the model's own text
        if not calls:
            return rest, []
        return _TOOL_CALL_BLOCK.sub("", rest).strip(), calls

    def _take(self, end: int) -> str:
        delta = self._text[self._num_sent : end]
        self._num_sent = max(self._num_sent, end)
        return delta
