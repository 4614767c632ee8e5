"""Tool calls: how a chat request's tools shape its generation, and how the output is read
back into OpenAI's `tool_calls`. Pure functions and small readers, no engine, no I/O.

  tool_choice   generation                                  output read as
  none          free text, tools not shown to the template  text
  auto          free text                                   text and calls in the version's `tool_parser` format
  required      JSON: a list of {"name", "arguments"}        those calls, each streamed as it is written
  {function}    JSON: that function's arguments              one call of it, streamed

`required` and a named function are forced through structured output, so they work on any
model; `auto` relies on the model writing its own call format: the one its chat template
teaches, or the one a version's `tool_parser` names (`server/api/tool_formats.py`: hermes,
also what baton asks for where a chat template cannot show tools itself; mistral;
llama3_json; pythonic), or one of vLLM's parsers where vLLM is installed
(`server/api/vllm_tool_parsers.py`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from models.errors import InvalidRequestError
from server.api.tool_formats import CALL_FORMATS, CallFormat
from server.engines.base import OutputFormat
from server.engines.detokenizer import held_back_length

DEFAULT_TOOL_PARSER = "hermes"


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

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def new_call(name: str, arguments: object) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(new_call_id(), name, text)


@dataclass(frozen=True)
class ToolPlan:
    functions: tuple[Function, ...]
    choice: str  # "auto", "required", or the name of the function that must be called

    def template_tools(self) -> list[dict]:
        return [f.as_tool() for f in self.functions]

    def output_format(self) -> OutputFormat | None:
        """The structured output that forces a call; None where the model chooses."""
        if self.choice == "auto":
            return None
        if self.choice == "required":
            return OutputFormat(json.dumps(calls_schema(self.functions)), param="tools")
        return OutputFormat(json.dumps(self._function(self.choice).parameters), param="tools")

    def reader(self, tool_parser: str = DEFAULT_TOOL_PARSER, tokenizer=None) -> OutputReader:
        """`tool_parser` and `tokenizer` (the version's) read `auto` output."""
        if self.choice == "required":
            return CallListReader()
        if self.choice != "auto":
            return ArgumentsReader(self.choice)
        if tool_parser in CALL_FORMATS:
            return FormatReader(CALL_FORMATS[tool_parser])
        from server.api.vllm_tool_parsers import VLLMReader  # imports vLLM: only versions naming its parsers pay

        return VLLMReader(tool_parser, tokenizer, self.template_tools())

    def _function(self, name: str) -> Function:
        return next(f for f in self.functions if f.name == name)


def check_tool_parser(name: str | None) -> None:
    """A version's `tool_parser` must be one baton or the installed vLLM can read."""
    from server.api import vllm_tool_parsers

    if name is not None and name not in CALL_FORMATS and name not in vllm_tool_parsers.names():
        known = ", ".join(sorted(set(CALL_FORMATS) | set(vllm_tool_parsers.names())))
        raise InvalidRequestError(f"Unknown tool_parser {name!r}; known here: {known}.", param="engine_options.tool_parser")


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
    may be sent now; `pieces` the call pieces ready to stream; `finish` the content held
    back and the calls found. Rule: every call streams as pieces; a reader that reads calls
    only at the end (`_read_at_the_end`) streams each whole, as one piece, after `finish`."""

    _unstreamed: tuple[ToolCall, ...] = ()

    def feed(self, text: str) -> str:
        raise NotImplementedError

    def pieces(self) -> list[ToolCallPiece]:
        calls, self._unstreamed = self._unstreamed, ()
        return [ToolCallPiece(index, call.arguments, call.id, call.name) for index, call in enumerate(calls)]

    def finish(self) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def _read_at_the_end(self, content: str, calls: list[ToolCall]) -> tuple[str, list[ToolCall]]:
        self._unstreamed = tuple(calls)
        return content, calls


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


ARGUMENT_KEYS = ("arguments", "parameters")  # llama3_json writes "parameters"


@dataclass
class _CallSoFar:
    id: str
    name: str | None = None
    arguments_at: int | None = None  # where its arguments' text starts in the output
    arguments_end: int | None = None  # where it ends, once written
    num_streamed: int = 0  # of its arguments' characters
    is_announced: bool = False  # its first piece (id and name) went out


class CallListReader(OutputReader):
    """The whole output is a JSON list of {"name", "arguments"} (forced by the grammar).
    Each call streams as it is written: a first piece with its id and name once the name is
    read, then its arguments' text as it comes. Output cut short (by max_tokens) keeps the
    calls begun, the last with its arguments so far, as a named call does; output cut
    before any name is content.

    A small scanner follows the JSON: depth 1 is the list, depth 2 a call's object; only
    strings and brackets change its state."""

    def __init__(self):
        self._text, self._scanned = "", 0
        self._depth, self._in_string, self._is_escaped = 0, False, False
        self._string_at = 0
        self._key: str | None = None  # the call's key whose value comes next, or last came
        self._value_pending = False  # after a key's colon, before its value's first character
        self._calls: list[_CallSoFar] = []

    def feed(self, text: str) -> str:
        self._text += text
        for at in range(self._scanned, len(self._text)):
            self._scan(at, self._text[at])
        self._scanned = len(self._text)
        return ""

    def pieces(self) -> list[ToolCallPiece]:
        ready = []
        for index, call in enumerate(self._calls):
            if call.name is None:
                continue
            start = call.arguments_at
            end = len(self._text) if call.arguments_end is None else call.arguments_end
            new = "" if start is None else self._text[start + call.num_streamed : end]
            if new or not call.is_announced:
                head = (call.id, call.name) if not call.is_announced else (None, None)
                ready.append(ToolCallPiece(index, new, *head))
                call.is_announced, call.num_streamed = True, call.num_streamed + len(new)
        return ready

    def finish(self) -> tuple[str, list[ToolCall]]:
        named = [call for call in self._calls if call.name is not None]
        if not named:
            return self._text, []
        return "", [ToolCall(call.id, call.name, self._arguments_of(call)) for call in named]

    def _arguments_of(self, call: _CallSoFar) -> str:
        if call.arguments_at is None:
            return ""
        return self._text[call.arguments_at : call.arguments_end]

    def _scan(self, at: int, char: str) -> None:
        if self._in_string:
            if self._is_escaped:
                self._is_escaped = False
            elif char == "\\":
                self._is_escaped = True
            elif char == '"':
                self._in_string = False
                self._string_ended(at)
            return
        if char.isspace():
            return
        if self._value_pending and self._depth == 2:
            self._value_pending = False
            if self._key in ARGUMENT_KEYS and self._calls:
                self._calls[-1].arguments_at = at
        if char == '"':
            self._in_string, self._string_at = True, at
        elif char in "[{":
            self._depth += 1
            if self._depth == 2:
                self._calls.append(_CallSoFar(new_call_id()))
                self._key = None
        elif char in "]}":
            self._depth -= 1
            if self._depth == 2:
                self._value_ended(at + 1)
            elif self._depth == 1:
                self._value_ended(at)
        elif char == ":" and self._depth == 2:
            self._value_pending = True
        elif char == "," and self._depth == 2:
            self._value_ended(at)
            self._key = None

    def _string_ended(self, at: int) -> None:
        if self._depth != 2 or not self._calls:
            return
        text = self._text[self._string_at : at + 1]
        if self._key is None:
            self._key = json.loads(text)
        elif self._key == "name" and self._calls[-1].name is None:
            self._calls[-1].name = json.loads(text)
        else:
            self._value_ended(at + 1)

    def _value_ended(self, end: int) -> None:
        """The call's current value ends at `end`: if it was the arguments, they are whole."""
        call = self._calls[-1] if self._calls else None
        if call is not None and self._key in ARGUMENT_KEYS and call.arguments_at is not None and call.arguments_end is None:
            call.arguments_end = end


class FormatReader(OutputReader):
    """Content until the format's calls start; from there on, held back. Text that could be
    the start of a marker is held until it is known not to be; so are leading blanks, while
    the answer could still open with a call. A format whose calls are JSON objects streams
    them as they are written (a CallListReader reads them, as one list); the others' are read
    at the end. Rule: calls that began to stream are the calls, in the stream and in the
    answer alike (cut short, the last keeps its arguments so far, as a forced call does)."""

    def __init__(self, call_format: CallFormat):
        self._format = call_format
        self._text, self._num_sent = "", 0
        self._calls_at: int | None = None
        self._may_lead = bool(call_format.leading)
        self._scanner = CallListReader() if call_format.streams else None
        if self._scanner is not None:
            self._scanner.feed("[")  # the calls, from where they start, read as one list
        self._num_scanned = 0

    def feed(self, text: str) -> str:
        self._text += text
        content = self._content()
        if self._scanner is not None and self._calls_at is not None:
            self._scanner.feed(self._text[max(self._num_scanned, self._calls_at) :])
            self._num_scanned = len(self._text)
        return content

    def pieces(self) -> list[ToolCallPiece]:
        return (self._scanner.pieces() if self._scanner is not None else []) + super().pieces()

    def finish(self) -> tuple[str, list[ToolCall]]:
        if self._calls_at is None:
            return self._take(len(self._text)), []
        parsed = self._format.parse(self._text[self._calls_at :])
        streamed = self._scanner.finish()[1] if self._scanner is not None else []
        if streamed:
            return (parsed[1] if parsed else ""), streamed
        if parsed is None:  # not calls after all: the model's own text
            return self._take(len(self._text)), []
        calls, content = parsed
        return self._read_at_the_end(content, [new_call(name, arguments) for name, arguments in calls])

    def _content(self) -> str:
        if self._calls_at is not None or self._opens_with_calls():
            return ""
        markers = self._format.markers
        starts = [at for marker in markers if (at := self._text.find(marker, self._num_sent)) != -1]
        if starts:
            self._calls_at = min(starts)
            return self._take(self._calls_at)
        return self._take(len(self._text) - held_back_length(self._text, markers))

    def _opens_with_calls(self) -> bool:
        """While nothing but blanks was sent: whether the answer opens with calls, or may."""
        if not self._may_lead:
            return False
        head = self._text.lstrip()
        if head and any(head.startswith(lead) for lead in self._format.leading):
            self._calls_at = len(self._text) - len(head)
            return True
        self._may_lead = not head or any(lead.startswith(head) for lead in self._format.leading)
        return self._may_lead

    def _take(self, end: int) -> str:
        delta = self._text[self._num_sent : end]
        self._num_sent = max(self._num_sent, end)
        return delta
