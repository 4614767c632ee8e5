"""The transformers engine's prefix cache: the KV of prompts' leading tokens, kept after their
prefill and again when their answer ends (prompt and answer), so that a prompt that starts
the same way (a chat's earlier turns and answers, a shared system prompt, a few-shot
preamble) prefills only the rest. vLLM's automatic prefix caching, for this engine.

Rules:
- A prefix is a whole number of BLOCK tokens and never a whole prompt: a prompt's last token
  is always prefilled, since its logits give the first token.
- An entry holds one sequence's prefix (a prompt's, or a prompt's and its answer's); a later
  one that extends it (the next turn of a chat) replaces it, so a conversation is kept once,
  not once per turn. A prompt may reuse any whole number of blocks an entry starts with.
- Entries are found by the chain of their blocks' hashes (one pass over a prompt) and then
  compared token by token: a hash collision can cost a miss, never another prompt's KV.
- At most `max_bytes` of KV are kept; the least recently used entry goes first.
- The KV depends on the weights: whoever changes them empties the cache (`clear`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

BLOCK = 16  # tokens: vLLM's block size

# A prompt's prefix of `length` tokens, one (keys, values) pair of (heads, length, dim) per layer.
KVOf = Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(eq=False)
class Prefix:
    token_ids: tuple[int, ...]
    block_hashes: list[int]  # of the chain of its blocks: block_hashes[i] covers (i + 1) * BLOCK tokens
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (keys, values) per layer, (heads, tokens, dim)
    num_bytes: int


@dataclass(frozen=True)
class Hit:
    prefix: Prefix
    length: int  # the tokens reused: its first `length`

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the reused keys and values, as a batch of one row (views, not copies)."""
        return [(keys[None, :, : self.length], values[None, :, : self.length]) for keys, values in self.prefix.layers]


def reusable_length(num_prompt_tokens: int) -> int:
    """The longest prefix of a prompt this long that may come from the cache."""
    return (num_prompt_tokens - 1) // BLOCK * BLOCK


def block_hashes(token_ids: Sequence[int], length: int) -> list[int]:
    """The chain of hashes of the first `length` tokens' blocks (`length` a multiple of BLOCK)."""
    hashes, previous = [], 0
    for start in range(0, length, BLOCK):
        previous = hash((previous, *token_ids[start : start + BLOCK]))
        hashes.append(previous)
    return hashes


class PrefixCache:
    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes
        self._by_hash: dict[int, Prefix] = {}  # a block chain's hash -> an entry that starts with it
        self._recent: OrderedDict[Prefix, None] = OrderedDict()  # least recently used first
        self.num_bytes = 0
        self.num_hit_tokens = 0  # prompt tokens taken from the cache, since the engine started

    def __len__(self) -> int:
        return len(self._recent)

    def lookup(self, token_ids: Sequence[int]) -> Hit | None:
        """The longest cached prefix of the prompt `token_ids`, if any."""
        hashes = block_hashes(token_ids, reusable_length(len(token_ids)))
        for num_blocks in range(len(hashes), 0, -1):
            prefix, length = self._by_hash.get(hashes[num_blocks - 1]), num_blocks * BLOCK
            if prefix is not None and prefix.token_ids[:length] == tuple(token_ids[:length]):
                self._recent.move_to_end(prefix)
                self.num_hit_tokens += length
                return Hit(prefix, length)
        return None

    def keep(self, token_ids: Sequence[int], kv_of: KVOf) -> None:
        """Keep the prompt `token_ids`' reusable prefix, its KV copied from `kv_of(length)`."""
        length = reusable_length(len(token_ids))
        if length <= 0:
            return
        tokens, hashes = tuple(token_ids[:length]), block_hashes(token_ids, length)
        held = self._by_hash.get(hashes[-1])
        if held is not None and held.token_ids[:length] == tokens:
            self._recent.move_to_end(held)
            return
        layers = [(keys.clone(), values.clone()) for keys, values in kv_of(length)]
        prefix = Prefix(tokens, hashes, layers, sum(keys.nbytes + values.nbytes for keys, values in layers))
        if prefix.num_bytes > self._max_bytes:
            return
        for extended in {p for h in hashes if (p := self._by_hash.get(h)) is not None and tokens[: len(p.token_ids)] == p.token_ids}:
            self._drop(extended)  # the new entry holds all of it
        for block_hash in hashes:
            self._by_hash[block_hash] = prefix
        self._recent[prefix] = None
        self.num_bytes += prefix.num_bytes
        while self.num_bytes > self._max_bytes:
            self._drop(next(iter(self._recent)))

    def clear(self) -> None:
        self._by_hash.clear()
        self._recent.clear()
        self.num_bytes = 0

    def describe(self) -> str:
        return f"{len(self)} prefixes, {self.num_bytes / 2**20:.1f} of {self._max_bytes / 2**20:.0f} MiB, {self.num_hit_tokens} prompt tokens reused"

    def _drop(self, prefix: Prefix) -> None:
        del self._recent[prefix]
        self.num_bytes -= prefix.num_bytes
        for block_hash in prefix.block_hashes:
            if self._by_hash.get(block_hash) is prefix:
                del self._by_hash[block_hash]
