"""OpenAI's response shapes, whole and streamed: chat completions (messages, tool calls,
per-token logprobs) and text completions (the legacy logprobs lists)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from server.api.tools import ToolCall
from server.engines.base import TokenLogprob


@dataclass(frozen=True)
class ChatFormat:
    wants_logprobs: bool
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: Sequence[TokenLogprob], tool_calls: Sequence[ToolCall] = (), reasoning: str = "") -> dict:
        message = {"role": "assistant", "content": text or (None if tool_calls else "")}
        if reasoning:  # vLLM's field (its older name, reasoning_content, is gone from its answers)
            message["reasoning"] = reasoning
        if tool_calls:
            message["tool_calls"] = [call.as_openai() for call in tool_calls]
        return {"index": index, "message": message, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}

    def opening_delta(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, text: str, finish_reason: str | None, logprobs: Sequence[TokenLogprob] = (), tool_call_deltas: Sequence[dict] = (), reasoning: str = "") -> dict:
        """`tool_call_deltas`: whole calls or pieces of them, in OpenAI's delta shape."""
        delta = {"reasoning": reasoning} if reasoning else {}
        if text:
            delta["content"] = text
        if tool_call_deltas:
            delta["tool_calls"] = list(tool_call_deltas)
        return {"index": index, "delta": delta, "logprobs": self._logprobs(logprobs) if logprobs else None, "finish_reason": finish_reason}

    def _logprobs(self, logprobs: Sequence[TokenLogprob]) -> dict | None:
        """OpenAI's chat shape: per token its text, bytes, logprob and the top alternatives."""
        if not self.wants_logprobs:
            return None
        content = [{**_token(t.token, t.logprob), "top_logprobs": [_token(text, value) for text, value in t.top]} for t in logprobs]
        return {"content": content, "refusal": None}


@dataclass(frozen=True)
class TextFormat:
    wants_logprobs: bool
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: Sequence[TokenLogprob] = (), tool_calls: Sequence[ToolCall] = (), reasoning: str = "") -> dict:
        """`tool_calls` and `reasoning` are always empty: completions take no tools and are not split."""
        return {"index": index, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}

    def opening_delta(self, index: int) -> dict | None:
        return None

    delta = choice

    def _logprobs(self, logprobs: Sequence[TokenLogprob]) -> dict | None:
        """The legacy completions shape: parallel lists, top alternatives as {text: logprob};
        an echoed prompt's first token has null for both (nothing came before it)."""
        if not self.wants_logprobs:
            return None
        offsets = list(accumulate((len(t.token) for t in logprobs), initial=0))[:-1]
        return {
            "tokens": [t.token for t in logprobs],
            "token_logprobs": [t.logprob for t in logprobs],
            "top_logprobs": [None if t.logprob is None else dict(t.top) for t in logprobs],
            "text_offset": offsets,
        }


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
