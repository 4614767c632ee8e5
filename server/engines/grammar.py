"""Output constrained to JSON on the transformers engine, through xgrammar (the grammar
library vLLM uses): a compiler per tokenizer, a token mask per generation.

Rule: the mask is applied before sampling, so every token drawn keeps the output a prefix
of a valid answer; when the JSON is complete only a stop token is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from models.errors import InvalidRequestError
from server.engines.base import JsonFormat


class JsonGrammars:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int]):
        import xgrammar

        self._xgrammar = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgrammar.GrammarCompiler(info)  # caches compiled grammars
        self._vocab_size = vocab_size

    def mask_for(self, json_format: JsonFormat) -> TokenMask:
        """A fresh mask for one generation. Compiling can take a while for a large schema:
        call it off the event loop."""
        try:
            if json_format.schema is None:
                grammar = self._compiler.compile_builtin_json_grammar()
            else:
                grammar = self._compiler.compile_json_schema(json_format.schema)
        except (RuntimeError, ValueError) as error:
            raise InvalidRequestError(f"The JSON schema cannot be used: {error}", param="response_format") from error
        return TokenMask(self._xgrammar, grammar, self._vocab_size)


class TokenMask:
    """Which tokens may come next, for one generation; used on the engine's worker thread."""

    def __init__(self, xgrammar, grammar, vocab_size: int):
        self._xgrammar = xgrammar
        self._matcher = xgrammar.GrammarMatcher(grammar)
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of the row of logits with every token the grammar forbids at -inf."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        row = logits.float().clone().unsqueeze(0)
        self._xgrammar.apply_token_bitmask_inplace(row, self._bitmask.to(row.device), vocab_size=self._vocab_size)
        return row[0]

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} does not continue the JSON answer")
