"""The ways models write tool calls in free text, for `tool_choice: auto`. A version names
its format with the `tool_parser` option (default `hermes`). Pure: text in, calls out.

  hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number of blocks (Qwen, Hermes)
  mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...], or [TOOL_CALLS]name[ARGS]{...} (Mistral)
  llama3_json  {"name": ..., "parameters": {...}} as the whole answer, `;`-separated, maybe after <|python_tag|> (Llama 3.x)
  pythonic     [get_weather(city="Paris"), ...] as the whole answer (Llama 3.2/4 small models)

Each format says where calls begin: at a marker anywhere in the text, or (for formats whose
calls are the whole answer) at its very start. Text before that point is content. hermes
and llama3_json calls stream as they are written; the others' come whole at the end.

A version without a `tool_parser` gets the format its chat template teaches (`format_taught_by`).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

ParsedCall = tuple[str, object]  # a function's name and its arguments (an object, or JSON text)


@dataclass(frozen=True)
class CallFormat:
    name: str
    markers: tuple[str, ...]  # anywhere in the text, one of these starts the calls
    leading: tuple[str, ...]  # at the start of the answer (after blanks), one of these starts the calls
    # The text from where the calls start -> the calls and any content left around them;
    # None when the text is not calls after all (it is then the model's own content).
    parse: Callable[[str], tuple[list[ParsedCall], str] | None]
    # Its calls are JSON objects one after another, with nothing but tags and separators
    # between them (no quote, bracket, colon or comma): they stream as they are written.
    streams: bool = False


def _json_call(data: object) -> ParsedCall:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError("a call is an object with a name")
    return data["name"], data.get("arguments", data.get("parameters", {}))


_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def _parse_hermes(text: str) -> tuple[list[ParsedCall], str] | None:
    try:
        calls = [_json_call(json.loads(block)) for block in _HERMES_BLOCK.findall(text)]
    except ValueError:
        return None
    return (calls, _HERMES_BLOCK.sub("", text).strip()) if calls else None


def _parse_mistral(text: str) -> tuple[list[ParsedCall], str] | None:
    """Either a JSON list after the marker, or one `name[ARGS]{...}` per marker (newer tokenizers)."""
    parts = [part.strip() for part in text.split("[TOOL_CALLS]") if part.strip()]
    try:
        if len(parts) == 1 and parts[0][:1] in "[{":
            data = json.loads(parts[0])
            return [_json_call(call) for call in (data if isinstance(data, list) else [data])], ""
        calls = []
        for part in parts:
            name, _, arguments = part.partition("[ARGS]")
            if not name or not arguments:
                return None
            calls.append((name.strip(), json.loads(arguments)))
        return (calls, "") if calls else None
    except ValueError:
        return None


def _parse_llama3_json(text: str) -> tuple[list[ParsedCall], str] | None:
    text = text.strip().removeprefix("<|python_tag|>")
    decoder, calls, at = json.JSONDecoder(), [], 0
    try:
        while at < len(text):
            data, end = decoder.raw_decode(text, at)
            calls.append(_json_call(data))
            at = end
            while at < len(text) and text[at] in " \t\r\n;":
                at += 1
    except ValueError:
        return None
    return (calls, "") if calls else None


_PYTHON_TAGS = ("<|python_start|>", "<|python_end|>")


def _parse_pythonic(text: str) -> tuple[list[ParsedCall], str] | None:
    """Read with `ast` and `literal_eval`: nothing is ever evaluated."""
    for tag in _PYTHON_TAGS:
        text = text.replace(tag, "")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for call in tree.elts:
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
                return None
            calls.append((call.func.id, {k.arg: ast.literal_eval(k.value) for k in call.keywords}))
        return calls, ""
    except (SyntaxError, ValueError, TypeError):
        return None


CALL_FORMATS = {
    f.name: f
    for f in (
        CallFormat("hermes", ("<tool_call>",), (), _parse_hermes, streams=True),
        CallFormat("mistral", ("[TOOL_CALLS]",), (), _parse_mistral),
        CallFormat("llama3_json", ("<|python_tag|>",), ("{",), _parse_llama3_json, streams=True),
        CallFormat("pythonic", ("<|python_start|>",), ("[",), _parse_pythonic),
    )
}


# What a chat template writes when it teaches its model a call format, first match wins.
_TAUGHT = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"), ("<|python_start|>", "pythonic"), ("<|python_tag|>", "llama3_json"))


def format_taught_by(chat_template: str | None) -> str:
    """The call format a chat template teaches; hermes where it teaches none (baton then
    describes the tools itself, in the Hermes format)."""
    for marker, name in _TAUGHT:
        if chat_template and marker in chat_template:
            return name
    return "hermes"
