"""OpenAI's response shapes, whole and streamed: chat completions (messages, tool calls,
per-token logprobs) and text completions (the legacy logprobs lists), with vLLM's token
fields where asked for (`TokenFields`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from server.api.tools import ToolCall
from server.engines.base import Candidate, TokenLogprob

MIN_LOGPROB = -9999.0  # what vLLM's server sends for -inf


@dataclass(frozen=True)
class TokenFields:
    """vLLM's token fields of an answer: the token ids of the prompt and of each choice
    (`return_token_ids`, for clients that must not tokenize the text again: RL rollouts), and
    each prompt token's logprob (`prompt_logprobs`) in vLLM's shape: null for the first token,
    then {token id: {logprob, rank, decoded_token}} for the prompt's own token and the k most
    likely there. Chat puts the prompt's fields beside `choices`, completions in each choice.
    With `as_ids`, logprobs name tokens by id, for tokens whose text is not theirs alone (half
    a UTF-8 character) or not unique."""

    token_ids: bool = False
    prompt_logprobs: bool = False
    as_ids: bool = False  # `return_tokens_as_token_ids`: logprobs name tokens "token_id:N", whatever their text

    def name(self, text: str, token_id: int | None) -> str:
        return f"token_id:{token_id}" if self.as_ids and token_id is not None else text

    def of_choice(self, token_ids: Sequence[int]) -> dict:
        return {"token_ids": list(token_ids)} if self.token_ids else {}

    def of_prompt(self, prompt_ids: Sequence[int], scored: Sequence[TokenLogprob] = ()) -> dict:
        fields = {"prompt_token_ids": list(prompt_ids)} if self.token_ids else {}
        if self.prompt_logprobs:
            fields["prompt_logprobs"] = [_prompt_logprob(t) for t in scored]
        return fields


def _prompt_logprob(scored: TokenLogprob) -> dict | None:
    if scored.logprob is None:
        return None
    entries = {scored.token_id: _ranked(scored.logprob, scored.rank, scored.token)}
    for rank, candidate in enumerate(scored.top, start=1):
        entries.setdefault(candidate.token_id, _ranked(candidate.logprob, rank, candidate.token))
    return {str(token_id): entry for token_id, entry in entries.items()}


def _ranked(logprob: float, rank: int | None, text: str) -> dict:
    return {"logprob": _finite(logprob), "rank": rank, "decoded_token": text}


def _finite(logprob: float | None) -> float | None:
    """Rule: no logprob is sent as -inf (JSON has no infinity); a token that could not be
    drawn (masked by a grammar, a top_k) is sent as MIN_LOGPROB, as vLLM's server sends it."""
    return None if logprob is None else max(logprob, MIN_LOGPROB)


@dataclass(frozen=True)
class ChatFormat:
    wants_logprobs: bool
    tokens: TokenFields = TokenFields()
    prompt_per_choice = False  # one prompt: its token fields go beside `choices`
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
        return {"content": token_logprobs(logprobs, self.tokens.name), "refusal": None}


@dataclass(frozen=True)
class TextFormat:
    wants_logprobs: bool
    tokens: TokenFields = TokenFields()
    prompt_per_choice = True  # one prompt or many: each choice carries its prompt's token fields
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
        name = self.tokens.name
        offsets = list(accumulate((len(t.token) for t in logprobs), initial=0))[:-1]
        return {
            "tokens": [name(t.token, t.token_id) for t in logprobs],
            "token_logprobs": [_finite(t.logprob) for t in logprobs],
            "top_logprobs": [None if t.logprob is None else {name(c.token, c.token_id): _finite(c.logprob) for c in t.top} for t in logprobs],
            "text_offset": offsets,
        }


def token_logprobs(logprobs: Sequence[TokenLogprob], name=TokenFields().name) -> list[dict]:
    """OpenAI's per-token shape (chat's `logprobs.content`, Responses' `output_text.logprobs`):
    each token's text, bytes, logprob and the top alternatives."""
    return [{**_token(t, name), "top_logprobs": [_token(c, name) for c in t.top]} for t in logprobs]


def _token(scored: TokenLogprob | Candidate, name) -> dict:
    """`bytes`: the token's own text's, whatever name it is sent under."""
    return {"token": name(scored.token, scored.token_id), "logprob": _finite(scored.logprob), "bytes": list(scored.token.encode())}
