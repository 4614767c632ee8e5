"""Continuous batching on a transformers model: sequences join and leave between steps.

Every running sequence is one row of a row cache (`kv_cache.PaddedRows`, or
`static_rows.StaticRows` whose decode steps are CUDA graphs): new sequences are prefilled
together, then joined to the running rows; finished or aborted rows are cut out. A new
sequence whose prompt starts with a cached prefix (`prefix_cache.py`) is prefilled alone,
from that prefix's KV on; so is a long prompt, and one that arrives while others run is
prefilled a chunk of `prefill_chunk` tokens between two decode steps (chunked prefill: it
never stalls the running streams for its whole prefill; with nothing running it goes whole,
which is sooner). All of this runs on the engine's worker thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache

from server.engines.base import Candidate, Chunk, FinishReason, GenerationRequest, TokenLogprob
from server.engines.detokenizer import IncrementalDetokenizer
from server.engines.grammar import TokenMask
from server.engines.kv_cache import forward, forward_positions, left_padded, new_cache, positions_of
from server.engines.prefix_cache import Hit, KVOf, PrefixCache
from server.engines.sampler import adjusted_logits, choose_tokens, prompt_logprobs, token_logprobs, truncated
from server.engines.thinking import ThinkingCounter
from models.errors import EngineError


class RowCache(Protocol):
    """The running sequences' KV cache, a row each (see `kv_cache.py`)."""

    can_join_running: bool

    def join(self, cache, attention_mask: torch.Tensor) -> None: ...
    def decode(self, token_ids: list[int]) -> torch.Tensor: ...
    def keep(self, rows: list[int]) -> None: ...
    def row_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]: ...  # per layer, (heads, tokens, dim)
    def prepare(self, cache) -> None: ...  # once loaded, with a prefill's cache
    def describe(self) -> str: ...


@dataclass(eq=False)
class Sequence:
    """One generation in flight. `is_aborted` is the only field another thread may set."""

    request: GenerationRequest
    detokenizer: IncrementalDetokenizer
    seed: int  # with the step, fixes each draw (`kernels/sampling.py`)
    emit: Callable[[Chunk | BaseException], None]
    token_mask: TokenMask | None = None  # JSON output: which tokens may come next
    thinking: ThinkingCounter | None = None  # a thinking budget: which token it forces next
    output_token_ids: list[int] = field(default_factory=list)
    unreported_token_ids: list[int] = field(default_factory=list)
    unreported_logprobs: list[TokenLogprob] = field(default_factory=list)
    unreported_prompt_logprobs: tuple[TokenLogprob, ...] = ()  # go with the first chunk
    unreported_cached_tokens: int = 0  # the prompt's tokens the prefix cache held: with the first chunk
    is_aborted: bool = False
    has_failed: bool = False  # ended by an error of its own; its row leaves the batch
    finish_reason: FinishReason | None = field(default=None)
    _prompt_ids: torch.Tensor | None = None

    def prompt_ids_on(self, device: torch.device) -> torch.Tensor:
        """The prompt's distinct token ids, made once: repetition_penalty reads them at every
        step (rebuilt each step from an 8k-token prompt, 0.7 ms a row a step)."""
        if self._prompt_ids is None:
            self._prompt_ids = torch.tensor(list(self.request.prompt_token_ids), dtype=torch.long, device=device).unique()
        return self._prompt_ids


@dataclass(eq=False)
class Prefill:
    """A prompt prefilled alone, from its cached prefix on, a chunk at a time."""

    sequence: Sequence
    cache: DynamicCache
    num_done: int  # the prompt's tokens `cache` holds

    @property
    def num_left(self) -> int:
        return len(self.sequence.request.prompt_token_ids) - self.num_done


class ContinuousBatch:
    def __init__(self, model, rows: RowCache, eos_token_ids: set[int], pad_token_id: int, prefixes: PrefixCache | None = None, prefill_chunk: int = 0):
        """`prefixes`: None where prompts are always prefilled whole; `prefill_chunk`: the most
        prompt tokens one prefill step takes from a prompt prefilled alone (0: all)."""
        self._model = model
        self.rows = rows
        self._eos_token_ids = eos_token_ids
        self._pad_token_id = pad_token_id
        self._device = model.device
        self.prefixes = prefixes
        self._prefill_chunk = prefill_chunk
        self.sequences: list[Sequence] = []
        self.prefilling: list[Prefill] = []  # long prompts, oldest first, prefilled a chunk a step
        self.num_aborted = 0
        self.num_chunked = 0  # prompts prefilled in chunks, since the engine started

    @property
    def can_join_running(self) -> bool:
        return self.rows.can_join_running

    @property
    def num_rows(self) -> int:
        """The rows in use, and those the prompts being prefilled will take."""
        return len(self.sequences) + len(self.prefilling)

    def admit(self, new: list[Sequence]) -> None:
        """Prefill `new`, emit their first tokens, and join them to the batch: those whose
        prompt starts with a cached prefix one by one from it, long prompts one by one too (a
        chunk a step, `prefill_step`, while others run), the rest together. Rule: all
        prefills run before anything joins, so a prefill that fails leaves the batch as it was."""
        hits = {s: self._cached_prefix(s) for s in new}
        alone = {s: self._start_alone(s, hits[s]) for s in new if self._is_prefilled_alone(s, hits[s])}
        whole = [s for s in new if s not in alone]
        chunked = [prefill for prefill in alone.values() if self._is_chunked(prefill)]
        prefilled = [([s], self._prefill_rest(prefill)) for s, prefill in alone.items() if prefill not in chunked]
        prefilled = ([(whole, self._prefill_together(whole))] if whole else []) + prefilled
        self.prefilling.extend(chunked)
        self.num_chunked += len(chunked)
        for group, (cache, attention_mask, _) in prefilled:
            self.rows.join(cache, attention_mask)
            self.sequences.extend(group)
        if prefilled:
            self._advance([s for group, _ in prefilled for s in group], torch.cat([logits for _, (_, _, logits) in prefilled]))

    def prefill_step(self) -> None:
        """The next chunk of the oldest long prompt; with its last, it joins the batch and
        draws its first token. Rule: a chunk that fails fails its own request only."""
        prefill = self.prefilling[0]
        try:
            logits = self._prefill_chunk_of(prefill, min(self._prefill_chunk, prefill.num_left))
        except Exception as error:
            self.prefilling.pop(0)
            prefill.sequence.emit(EngineError(f"Generation failed: {error}"))
            return
        if prefill.num_left:
            return
        self.prefilling.pop(0)
        self._keep_prefix(prefill.sequence, prefill.cache, 0, 0)
        self.rows.join(prefill.cache, self._ones(prefill.num_done))
        self.sequences.append(prefill.sequence)
        self._advance([prefill.sequence], logits)

    def _is_prefilled_alone(self, sequence: Sequence, hit: Hit | None) -> bool:
        """A prompt that starts with a cached prefix, or one longer than a chunk; never one that
        scores its prompt (it needs every position's logits, from one prefill)."""
        if sequence.request.sampling.prompt_logprobs is not None:
            return False
        return hit is not None or 0 < self._prefill_chunk < len(sequence.request.prompt_token_ids)

    def _is_chunked(self, prefill: Prefill) -> bool:
        """Longer than a chunk, and others run: into an idle batch it goes whole (one pass is
        sooner, and nobody waits)."""
        return self.num_rows > 0 and 0 < self._prefill_chunk < prefill.num_left

    def _cached_prefix(self, sequence: Sequence) -> Hit | None:
        """A request that scores its prompt needs every position's logits: it is prefilled whole."""
        if self.prefixes is None or sequence.request.sampling.prompt_logprobs is not None:
            return None
        hit = self.prefixes.lookup(sequence.request.prompt_token_ids)
        sequence.unreported_cached_tokens = hit.length if hit else 0
        return hit

    def _prefill_together(self, new: list[Sequence]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """The prompts left-padded to one length: their cache, attention mask and last logits.
        The logits of every position are kept only where a sequence asks for its prompt's logprobs."""
        input_ids, attention_mask = left_padded([s.request.prompt_token_ids for s in new], self._pad_token_id, self._device)
        cache = new_cache(self._model.config)
        scores_prompts = any(s.request.sampling.prompt_logprobs is not None for s in new)
        logits = forward_positions(self._model, input_ids, attention_mask, positions_of(attention_mask), cache, logits_to_keep=0 if scores_prompts else 1)
        if scores_prompts:
            self._score_prompts(new, logits)
        for row, sequence in enumerate(new):
            self._keep_prefix(sequence, cache, row, input_ids.shape[1] - len(sequence.request.prompt_token_ids))
        return cache, attention_mask, logits[:, -1, :]

    def _start_alone(self, sequence: Sequence, hit: Hit | None) -> Prefill:
        """A prefill of one prompt, its cache holding its cached prefix (if any)."""
        cache = new_cache(self._model.config)
        if hit is not None:
            for layer, (keys, values) in zip(cache.layers, hit.layers(), strict=True):
                layer.update(keys, values)
        return Prefill(sequence, cache, hit.length if hit else 0)

    def _prefill_rest(self, prefill: Prefill) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """All that is left of one prompt at once: its cache, attention mask and last logits."""
        logits = self._prefill_chunk_of(prefill, prefill.num_left)
        self._keep_prefix(prefill.sequence, prefill.cache, 0, 0)
        return prefill.cache, self._ones(prefill.num_done), logits

    def _prefill_chunk_of(self, prefill: Prefill, num_tokens: int) -> torch.Tensor:
        """The next `num_tokens` of the prompt into its cache: the last one's logits."""
        start, end = prefill.num_done, prefill.num_done + num_tokens
        input_ids = torch.tensor([list(prefill.sequence.request.prompt_token_ids[start:end])], device=self._device)
        positions = torch.arange(start, end, device=self._device)[None]
        logits = forward(self._model, input_ids, self._ones(end), positions, prefill.cache)
        prefill.num_done = end
        return logits

    def _ones(self, length: int) -> torch.Tensor:
        """The attention mask of one row of `length` tokens, none of them padding."""
        return torch.ones((1, length), dtype=torch.long, device=self._device)

    def _keep_answered(self, sequences: list[Sequence]) -> None:
        """Each finished sequence's prompt and answer kept as a prefix, before its row goes:
        a chat's next turn resends both. Its row holds every token but the last drawn (never fed)."""
        if self.prefixes is None:
            return
        for sequence in sequences:
            if sequence.finish_reason is None or sequence.has_failed or sequence.is_aborted:
                continue
            token_ids = [*sequence.request.prompt_token_ids, *sequence.output_token_ids[:-1]]
            layers = self.rows.row_kv(self.sequences.index(sequence))
            if layers[0][0].shape[1] == len(token_ids):
                self.prefixes.keep(token_ids, _first_tokens(layers))

    def _keep_prefix(self, sequence: Sequence, cache: DynamicCache, row: int, start: int) -> None:
        """The prompt's KV (row `row` of `cache`, from column `start`) kept for later prompts."""
        if self.prefixes is not None:
            layers = [(layer.keys[row, :, start:], layer.values[row, :, start:]) for layer in cache.layers]
            self.prefixes.keep(sequence.request.prompt_token_ids, _first_tokens(layers))

    @staticmethod
    @torch.inference_mode()
    def _score_prompts(new: list[Sequence], logits: torch.Tensor) -> None:
        """Each asking sequence's prompt logprobs: position i's logits score token i + 1 (rows
        are left-padded, so a prompt ends at the last column); the first token has none."""
        for row, sequence in enumerate(new):
            num_top, prompt = sequence.request.sampling.prompt_logprobs, list(sequence.request.prompt_token_ids)
            if num_top is None:
                continue
            text_of = sequence.detokenizer.token_text
            scored = prompt_logprobs(logits[row, logits.shape[1] - len(prompt) : -1], prompt[1:], num_top)
            rest = [_token_logprob(text_of, token_id, logprob, top, rank) for token_id, (logprob, rank, top) in zip(prompt[1:], scored)]
            sequence.unreported_prompt_logprobs = (TokenLogprob(text_of(prompt[0]), None, token_id=prompt[0]), *rest)

    def warm_up(self) -> None:
        """A one-token prefill, and the row cache set up with its cache (CUDA graphs captured)."""
        input_ids = torch.tensor([[self._pad_token_id]], device=self._device)
        cache = new_cache(self._model.config)
        forward(self._model, input_ids, torch.ones_like(input_ids), torch.zeros_like(input_ids), cache)
        self.rows.prepare(cache)

    def step(self) -> None:
        """Decode one token for every running sequence."""
        logits = self.rows.decode([s.output_token_ids[-1] for s in self.sequences])
        self._advance(self.sequences, logits)

    def drop_aborted(self) -> None:
        kept, prefilling = [s for s in self.sequences if not s.is_aborted], [p for p in self.prefilling if not p.sequence.is_aborted]
        self.num_aborted += self.num_rows - len(kept) - len(prefilling)
        self.prefilling = prefilling
        self._keep(kept)

    def fail_all(self, error: BaseException) -> None:
        for sequence in [*self.sequences, *(p.sequence for p in self.prefilling)]:
            sequence.emit(error)
        self.prefilling = []
        self._keep([])

    @torch.inference_mode()  # rows of the model's logits are shaped in place
    def _advance(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        """Sample, then cut finished rows, then emit: a client that has its last chunk
        never sees its row still in the batch. Rule: a row that fails (its own sampling
        parameters, its own text) fails alone; the rest of the batch goes on."""
        logits = logits.float()
        errors = [self._mask_row(s, logits, row) for row, s in enumerate(sequences)]
        scored = {row: logits[row].clone() for row, (s, error) in enumerate(zip(sequences, errors)) if s.request.sampling.logprobs is not None and error is None}
        errors = [error or self._shape_row(s, logits, row) for row, (s, error) in enumerate(zip(sequences, errors))]
        steps = [len(s.output_token_ids) for s in sequences]
        samplings = [s.request.sampling for s in sequences]
        token_ids = choose_tokens(truncated(logits, samplings), samplings, [s.seed for s in sequences], steps)
        chunks = [
            error or self._next_chunk(s, scored.get(row), token_id)
            for row, (s, token_id, error) in enumerate(zip(sequences, token_ids, errors, strict=True))
        ]
        self._keep_answered(sequences)
        self._keep([s for s in self.sequences if s.finish_reason is None and not s.has_failed])
        for sequence, chunk in zip(sequences, chunks, strict=True):
            if chunk is not None:
                sequence.emit(chunk)

    def _mask_row(self, sequence: Sequence, logits: torch.Tensor, row: int) -> BaseException | None:
        """The request's grammar mask, written into its row of `logits`. Rule: a row's
        logprobs report its logits as they are after the mask and before anything else
        (vLLM's default, `raw_logprobs`): the model's own, not changed by temperature,
        penalties or bias; and bias or penalties cannot bring back a token the mask forbids."""
        try:
            if sequence.token_mask is not None:
                logits[row] = sequence.token_mask.masked(logits[row])
            return None
        except Exception as error:
            return _failed(sequence, error)

    def _shape_row(self, sequence: Sequence, logits: torch.Tensor, row: int) -> BaseException | None:
        """The request's bias and penalties, then no end before its min_tokens, then the
        token its thinking budget forces, written into its (masked) row of `logits`."""
        try:
            sampling = sequence.request.sampling
            if sampling.adjusts_logits:
                logits[row] = adjusted_logits(logits[row], sampling, sequence.prompt_ids_on(logits.device), sequence.output_token_ids)
            if len(sequence.output_token_ids) < sampling.min_tokens:
                _forbid_ending(logits[row], [*self._eos_token_ids, *sampling.stop_token_ids])
            if sequence.thinking is not None and (forced := sequence.thinking.forced_token()) is not None:
                _force(logits[row], forced)
            return None
        except Exception as error:
            return _failed(sequence, error)

    def _next_chunk(self, sequence: Sequence, scored: torch.Tensor | None, token_id: int) -> Chunk | BaseException | None:
        """`scored`: the row's logits as its logprobs report them (None: it asks for none)."""
        try:
            if sequence.token_mask is not None:
                sequence.token_mask.accept(token_id)
            if sequence.thinking is not None:
                sequence.thinking.accept(token_id)
            if scored is not None:
                sequence.unreported_logprobs.append(self._logprob(sequence, scored, token_id))
            return self._append(sequence, token_id)
        except Exception as error:
            return _failed(sequence, error)

    @staticmethod
    def _logprob(sequence: Sequence, scored: torch.Tensor, token_id: int) -> TokenLogprob:
        text_of = sequence.detokenizer.token_text
        return _token_logprob(text_of, token_id, *token_logprobs(scored, token_id, sequence.request.sampling.logprobs))

    def _append(self, sequence: Sequence, token_id: int) -> Chunk | None:
        sequence.output_token_ids.append(token_id)
        sequence.unreported_token_ids.append(token_id)
        sampling = sequence.request.sampling
        is_eos = (token_id in self._eos_token_ids and not sampling.ignore_eos) or token_id in sampling.stop_token_ids
        text = "" if is_eos else sequence.detokenizer.add(token_id)  # an ignored end of sequence adds what it decodes to
        sequence.finish_reason = self._finish_reason(sequence, is_eos)
        if sequence.finish_reason:
            text += sequence.detokenizer.flush()
        if not text and not sequence.finish_reason:
            return None
        token_ids = tuple(sequence.unreported_token_ids)
        chunk = Chunk(
            text, len(token_ids), sequence.finish_reason, tuple(sequence.unreported_logprobs), sequence.unreported_prompt_logprobs,
            sequence.detokenizer.stopped_by, token_ids, sequence.unreported_cached_tokens,
        )  # fmt: skip
        sequence.unreported_token_ids.clear()
        sequence.unreported_logprobs.clear()
        sequence.unreported_prompt_logprobs, sequence.unreported_cached_tokens = (), 0
        return chunk

    @staticmethod
    def _finish_reason(sequence: Sequence, is_eos: bool) -> FinishReason | None:
        if is_eos or sequence.detokenizer.is_stopped:
            return "stop"
        if len(sequence.output_token_ids) >= sequence.request.sampling.max_tokens:
            return "length"
        return None

    def _keep(self, kept: list[Sequence]) -> None:
        if len(kept) == len(self.sequences):
            return
        self.rows.keep([self.sequences.index(s) for s in kept])
        self.sequences = kept


def _token_logprob(text_of, token_id: int, logprob: float, top: list[tuple[int, float]], rank: int | None = None) -> TokenLogprob:
    """A token's logprob and its best alternatives' (token ids), with their texts."""
    return TokenLogprob(text_of(token_id), logprob, tuple(Candidate(text_of(i), value, i) for i, value in top), token_id, rank)


def _first_tokens(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> KVOf:
    """What the prefix cache copies from: the first `length` tokens of each layer's (heads, tokens, dim) keys and values."""
    return lambda length: [(keys[:, :length], values[:, :length]) for keys, values in layers]


def num_prefilled_together(waiting: list[Sequence], num_free: int) -> int:
    """How many of the waiting sequences, in order, one prefill takes: up to `num_free`; and a
    sequence that scores its prompt goes alone (its prefill keeps every position's logits,
    prompt length x vocabulary, which other prompts in its batch would multiply)."""
    count = 0
    for sequence in waiting[: max(num_free, 0)]:
        if sequence.request.sampling.prompt_logprobs is not None:
            return count or 1
        count += 1
    return count


def _forbid_ending(row: torch.Tensor, ending_ids: list[int]) -> None:
    """No end yet (min_tokens), unless ending is all the row still allows: a JSON answer
    that is complete must end (forbidden, it left no token to draw and the request failed)."""
    kept = row.clone()
    kept[ending_ids] = -torch.inf
    if torch.isfinite(kept).any():
        row.copy_(kept)


def _force(row: torch.Tensor, token_id: int) -> None:
    """`token_id` is the only token the row may draw."""
    row.fill_(-torch.inf)
    row[token_id] = 0.0


def _failed(sequence: Sequence, error: Exception) -> EngineError:
    sequence.has_failed = True
    return EngineError(f"Generation failed: {error}")
