"""Continuous batching on a transformers model: sequences join and leave between steps.

Every running sequence is one row of a left-padded KV cache (`kv_cache.py`: decode steps
write into spare columns). New sequences are prefilled together, then their cache rows are
padded to the running length and joined; finished or aborted rows are cut out, and padding
columns no row needs any more are trimmed. All of this runs on the engine's worker thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from server.engines.base import Chunk, FinishReason, GenerationRequest, TokenLogprob
from server.engines.detokenizer import IncrementalDetokenizer
from server.engines.grammar import TokenMask
from server.engines.kv_cache import new_cache
from server.engines.sampler import adjusted_logits, choose_tokens, token_logprobs
from models.errors import EngineError


@dataclass(eq=False)
class Sequence:
    """One generation in flight. `is_aborted` is the only field another thread may set."""

    request: GenerationRequest
    detokenizer: IncrementalDetokenizer
    seed: int  # with the step, fixes each draw (`kernels/sampling.py`)
    emit: Callable[[Chunk | BaseException], None]
    token_mask: TokenMask | None = None  # JSON output: which tokens may come next
    output_token_ids: list[int] = field(default_factory=list)
    num_unreported_tokens: int = 0
    unreported_logprobs: list[TokenLogprob] = field(default_factory=list)
    is_aborted: bool = False
    has_failed: bool = False  # ended by an error of its own; its row leaves the batch
    finish_reason: FinishReason | None = field(default=None)


class ContinuousBatch:
    def __init__(self, model, eos_token_ids: set[int], pad_token_id: int):
        self._model = model
        self._eos_token_ids = eos_token_ids
        self._pad_token_id = pad_token_id
        self._device = model.device
        self.sequences: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._attention_mask: torch.Tensor | None = None  # (rows, cached length)
        self.can_join_running = _has_plain_layers(DynamicCache(config=model.config))
        self.num_aborted = 0

    def admit(self, new: list[Sequence]) -> None:
        """Prefill `new` together, emit their first tokens, and join them to the batch."""
        input_ids, attention_mask = self._left_padded([s.request.prompt_token_ids for s in new])
        cache = new_cache(self._model.config)
        logits = self._forward(input_ids, attention_mask, _positions(attention_mask), cache)
        if self.sequences:
            self._join(cache, attention_mask)
        else:
            self._cache, self._attention_mask = cache, attention_mask
        self.sequences.extend(new)
        self._advance(new, logits)

    def step(self) -> None:
        """Decode one token for every running sequence."""
        input_ids = torch.tensor([[s.output_token_ids[-1]] for s in self.sequences], device=self._device)
        ones = torch.ones((len(self.sequences), 1), dtype=self._attention_mask.dtype, device=self._device)
        self._attention_mask = torch.cat([self._attention_mask, ones], dim=-1)
        positions = self._attention_mask.sum(-1, keepdim=True) - 1
        logits = self._forward(input_ids, self._attention_mask, positions, self._cache)
        self._advance(self.sequences, logits)

    def drop_aborted(self) -> None:
        kept = [s for s in self.sequences if not s.is_aborted]
        self.num_aborted += len(self.sequences) - len(kept)
        self._keep(kept)

    def fail_all(self, error: BaseException) -> None:
        for sequence in self.sequences:
            sequence.emit(error)
        self._keep([])

    @torch.inference_mode()
    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        output = self._model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1, :]

    @torch.inference_mode()  # rows of the model's logits are shaped in place
    def _advance(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        """Sample, then cut finished rows, then emit: a client that has its last chunk
        never sees its row still in the batch. Rule: a row that fails (its own sampling
        parameters, its own text) fails alone; the rest of the batch goes on."""
        logits = logits.float()
        errors = [self._shape_row(s, logits, row) for row, s in enumerate(sequences)]
        steps = [len(s.output_token_ids) for s in sequences]
        token_ids = choose_tokens(logits, [s.request.sampling for s in sequences], [s.seed for s in sequences], steps)
        chunks = [
            error or self._next_chunk(s, logits[row], token_id)
            for row, (s, token_id, error) in enumerate(zip(sequences, token_ids, errors, strict=True))
        ]
        self._keep([s for s in self.sequences if s.finish_reason is None and not s.has_failed])
        for sequence, chunk in zip(sequences, chunks, strict=True):
            if chunk is not None:
                sequence.emit(chunk)

    @staticmethod
    def _shape_row(sequence: Sequence, logits: torch.Tensor, row: int) -> BaseException | None:
        """The request's penalties and bias, then its JSON mask (last, so that no bias can
        force a token it forbids), written into its row of `logits`."""
        try:
            sampling = sequence.request.sampling
            if sampling.adjusts_logits:
                logits[row] = adjusted_logits(logits[row], sampling, sequence.output_token_ids)
            if sequence.token_mask is not None:
                logits[row] = sequence.token_mask.masked(logits[row])
            return None
        except Exception as error:
            return _failed(sequence, error)

    def _next_chunk(self, sequence: Sequence, logits: torch.Tensor, token_id: int) -> Chunk | BaseException | None:
        try:
            if sequence.token_mask is not None:
                sequence.token_mask.accept(token_id)
            if sequence.request.sampling.logprobs is not None:
                sequence.unreported_logprobs.append(self._logprob(sequence, logits, token_id))
            return self._append(sequence, token_id)
        except Exception as error:
            return _failed(sequence, error)

    @staticmethod
    def _logprob(sequence: Sequence, logits: torch.Tensor, token_id: int) -> TokenLogprob:
        sampling, text_of = sequence.request.sampling, sequence.detokenizer.token_text
        logprob, top = token_logprobs(logits, sampling, token_id, sampling.logprobs)
        return TokenLogprob(text_of(token_id), logprob, tuple((text_of(i), value) for i, value in top))

    def _append(self, sequence: Sequence, token_id: int) -> Chunk | None:
        sequence.output_token_ids.append(token_id)
        sequence.num_unreported_tokens += 1
        is_eos = token_id in self._eos_token_ids
        text = "" if is_eos else sequence.detokenizer.add(token_id)
        sequence.finish_reason = self._finish_reason(sequence, is_eos)
        if sequence.finish_reason:
            text += sequence.detokenizer.flush()
        if not text and not sequence.finish_reason:
            return None
        chunk = Chunk(text, sequence.num_unreported_tokens, sequence.finish_reason, tuple(sequence.unreported_logprobs))
        sequence.num_unreported_tokens = 0
        sequence.unreported_logprobs.clear()
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
        if not kept:
            self.sequences, self._cache, self._attention_mask = [], None, None
            return
        rows = torch.tensor([self.sequences.index(s) for s in kept], device=self._device)
        for layer in self._cache.layers:
            layer.batch_select_indices(rows)
        self._attention_mask = self._attention_mask[rows]
        self.sequences = kept
        self._trim_padding()

    def _trim_padding(self) -> None:
        """Drop leading cache columns that are padding in every remaining row."""
        if not self.can_join_running:
            return
        num_unused = int(self._attention_mask.any(dim=0).int().argmax())
        if num_unused:
            self._attention_mask = self._attention_mask[:, num_unused:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, num_unused:], layer.values[:, :, num_unused:]

    def _join(self, cache: DynamicCache, attention_mask: torch.Tensor) -> None:
        length = max(self._attention_mask.shape[-1], attention_mask.shape[-1])
        self._attention_mask = torch.cat(
            [_pad_left(self._attention_mask, length), _pad_left(attention_mask, length)], dim=0
        )
        for running, joining in zip(self._cache.layers, cache.layers, strict=True):
            running.keys = torch.cat([_pad_left(running.keys, length, -2), _pad_left(joining.keys, length, -2)])
            running.values = torch.cat([_pad_left(running.values, length, -2), _pad_left(joining.values, length, -2)])

    def _left_padded(self, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), self._pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt) :] = torch.tensor(list(prompt))
            attention_mask[row, length - len(prompt) :] = 1
        return input_ids.to(self._device), attention_mask.to(self._device)


def _failed(sequence: Sequence, error: Exception) -> EngineError:
    sequence.has_failed = True
    return EngineError(f"Generation failed: {error}")


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _pad_left(tensor: torch.Tensor, length: int, dim: int = -1) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _has_plain_layers(cache: DynamicCache) -> bool:
    """Rows can be joined only where every cache layer is a plain, unbounded one."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)
