"""Incremental detokenization with stop strings, one per generation."""

from __future__ import annotations

def held_back_length(text: str, markers: tuple[str, ...]) -> int:
    """How much of `text`'s end could be the start of one of `markers`: to hold back until
    the next text says whether it is. Runs at every token: linear in the markers, not
    quadratic (a 100,000-character stop string took 70 ms a call by prefixes)."""
    return max((_longest_partial(text, marker) for marker in markers), default=0)


def _longest_partial(text: str, marker: str) -> int:
    """The longest end of `text` that is a proper start of `marker`; 0 if none."""
    if not marker:
        return 0
    at = text.find(marker[0], max(0, len(text) - len(marker) + 1))
    while at != -1:
        if marker.startswith(text[at:]):
            return len(text) - at
        at = text.find(marker[0], at + 1)
    return 0


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas.

    Rules: text never contains anything after a stop string, nor the stop string itself
    unless `includes_stop`; a delta never ends in an incomplete UTF-8 character; text that
    could be the start of a stop string is held back until it is known not to be one. With
    `min_tokens`, stop strings are looked for only after the text of the first `min_tokens`
    tokens (as vLLM does). Special tokens' text is left out unless `skips_special` is false.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), min_tokens: int = 0, includes_stop: bool = False, skips_special: bool = True):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._min_tokens = min_tokens
        self._includes_stop = includes_stop
        self._skips_special = skips_special
        self._token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""
        self._stops_from = 0  # where a stop string may start: after the first min_tokens tokens' text
        self._num_chars_sent = 0
        self.is_stopped = False
        self.stopped_by: str | None = None  # the stop string found (the earliest, then the shortest)

    @classmethod
    def for_sampling(cls, tokenizer, sampling) -> "IncrementalDetokenizer":
        """As a request's sampling parameters (`server.engines.base.SamplingParams`) ask."""
        return cls(tokenizer, sampling.stop, sampling.min_tokens, sampling.include_stop_str_in_output, sampling.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Add one token; return the text that may be sent now."""
        self._token_ids.append(token_id)
        searched_from = max(self._stops_from, len(self._text) - max((len(s) for s in self._stop), default=0))
        self._text += self._decode_new_text()
        if len(self._token_ids) <= self._min_tokens:
            self._stops_from = len(self._text)
        else:
            self._cut_at_stop(searched_from)
        return self._take(self._num_sendable_chars())

    def token_text(self, token_id: int) -> str:
        """One token on its own, special tokens included (for logprobs)."""
        return self._tokenizer.decode([token_id])

    def flush(self) -> str:
        """The generation ended: release what was held back."""
        return self._take(len(self._text))

    def _decode_new_text(self) -> str:
        # Decode a short window that starts before the new tokens, and keep what the new
        # tokens added (vLLM's incremental detokenizer does the same).
        ids = self._token_ids
        prefix = self._decode(ids[self._prefix_offset : self._read_offset])
        full = self._decode(ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing visible yet, or half a UTF-8 character
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        return full[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skips_special)

    def _cut_at_stop(self, searched_from: int) -> None:
        hits = [(i, len(s), s) for s in self._stop if (i := self._text.find(s, searched_from)) != -1]
        if hits:
            at, length, self.stopped_by = min(hits)
            self._text = self._text[: at + length if self._includes_stop else at]
            self.is_stopped = True

    def _num_sendable_chars(self) -> int:
        if self.is_stopped:
            return len(self._text)
        return len(self._text) - held_back_length(self._text, self._stop)

    def _take(self, end: int) -> str:
        end = max(end, self._num_chars_sent)
        delta = self._text[self._num_chars_sent : end]
        self._num_chars_sent = end
        return delta
