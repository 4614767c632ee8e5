"""vLLM's tool-call parsers (`vllm serve --tool-call-parser NAME`), for `tool_choice: auto`
on versions whose `tool_parser` baton does not read itself, where vLLM is installed.

Rule: the whole answer is held and handed to the parser when it ends (vLLM's non-streaming
path): content and calls arrive with the last chunk. The parser gets the version's own
tokenizer, as in vLLM, because many look up their markers' token ids in it.
"""

from __future__ import annotations

import functools
import logging

from server.api.tools import OutputReader, ToolCall, new_call

log = logging.getLogger(__name__)


@functools.cache
def names() -> tuple[str, ...]:
    """The parsers the installed vLLM registers; none without vLLM."""
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:
        return ()
    return tuple(ToolParserManager.list_registered())


class VLLMReader(OutputReader):
    """Rule: a parser that cannot be built here (vLLM gone since the import, a tokenizer
    without the parser's markers) or that fails never fails the request: the answer is
    returned as content, and the log says why."""

    def __init__(self, name: str, tokenizer, tools: list[dict]):
        self._text, self._parser = "", None
        try:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
            from vllm.tool_parsers import ToolParserManager

            self._request = ChatCompletionRequest(model="baton", messages=[], tools=tools)
            self._parser = ToolParserManager.get_tool_parser(name)(tokenizer, self._request.tools)
        except Exception:
            log.exception("vLLM's tool parser %r cannot read this version's answers; they are returned as content", name)

    def feed(self, text: str) -> str:
        self._text += text
        return ""

    def finish(self) -> tuple[str, list[ToolCall]]:
        if self._parser is None:
            return self._text, []
        try:
            found = self._parser.extract_tool_calls(self._text, self._request)
        except Exception:  # a parser's failure must not lose the answer
            log.exception("vLLM's tool parser failed; the answer is returned as content")
            return self._text, []
        if not found.tools_called:
            return self._text, []
        return self._read_at_the_end(found.content or "", [new_call(call.function.name, call.function.arguments) for call in found.tool_calls])
