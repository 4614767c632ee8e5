"""An `Engine` on plain transformers: the CPU path, and a fallback on CUDA.

One worker thread owns the model and a `ContinuousBatch`; the event loop talks to it
through a waiting list (guarded by a condition) and per-generation asyncio queues.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import logging
import os
import threading
from concurrent.futures import Future
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from server.engines.base import Chunk, EngineHealth, GenerationRequest, OutputFormat
from server.engines.grammar import Grammars, TokenMask, mask_off_loop
from server.engines.thinking import ThinkingCounter
from server.engines.batch import ContinuousBatch, RowCache, Sequence, num_prefilled_together
from server.engines.kv_cache import PaddedRows, has_plain_layers
from server.engines.static_rows import StaticRows, can_use_static_rows, initial_columns
from server.engines.detokenizer import IncrementalDetokenizer
from server.engines.model_folder import check_model_folder, read_config
from server.engines.options import TransformersOptions
from server.engines.pooling import EMBED_BATCH, Pooler, embed
from server.engines.prefix_cache import PrefixCache
from server.engines.prompt import chat_prompt_ids, text_prompt_ids, with_chat_template_of
from server.engines.row_attention import use_row_attention
from server.engines.sampler import row_seed
from models.errors import EngineError, EngineStoppedError, ModelLoadError
from models.lora import ADAPTER_FOLDER, ReadAdapter, read_adapter

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # tokens, for a config that does not say


def context_length(max_position_embeddings: int | None, max_model_len: int | None) -> int:
    """The longest sequence the engine serves: the model's own, capped by `max_model_len`."""
    own = max_position_embeddings or DEFAULT_CONTEXT
    return min(own, max_model_len or own)


def config_dtype(config: dict) -> str | None:
    """The dtype a config.json says its weights are in (newer and older key)."""
    return config.get("dtype") or config.get("torch_dtype")


class TransformersEngine:
    name = "transformers"
    embeds = True  # any causal language model: its last hidden states, pooled
    generates = True

    def __init__(self, path: str | Path, options: TransformersOptions = TransformersOptions()):
        self._path = Path(path)
        self._options = options
        self._model = None
        self._tokenizer = None
        self._batch: ContinuousBatch | None = None
        self._waiting: list[Sequence] = []
        self._wakeup = threading.Condition()
        self._worker: threading.Thread | None = None
        self._loaded: Future | None = None  # done once the worker's load ends, either way
        self._calls: list[tuple[Callable[[], object], Future]] = []  # work for the worker, between steps
        self._is_stopping = False
        self._in_flight: dict[str, Sequence] = {}  # event-loop thread only
        self._grammars: Grammars | None = None  # built on the first request held to a grammar
        self._pooler = Pooler()  # the folder's, read as it loads (embeddings)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def max_model_len(self) -> int:
        return context_length(getattr(self._model.config, "max_position_embeddings", None), self._options.max_model_len)

    async def start(self) -> None:
        self._loaded = Future()
        self._worker = threading.Thread(target=self._run, args=(self._loaded,), name=f"baton-{self._path.name}", daemon=True)
        self._worker.start()
        # Shielded: a cancelled start must not cancel the worker's future (its load would end
        # in InvalidStateError, killing the thread); stop() tells the worker instead.
        await asyncio.shield(asyncio.wrap_future(self._loaded))

    def tokenize(self, text: str) -> list[int]:
        return text_prompt_ids(self._tokenizer, text)

    def tokenize_chat(self, messages: list[dict], tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
        return chat_prompt_ids(self._tokenizer, messages, tools, template_kwargs)

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        return self._stream(request)

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """A batch at a time on the worker, between decoding steps (pooling.py)."""
        vectors = []
        for start in range(0, len(prompts), EMBED_BATCH):
            batch = prompts[start : start + EMBED_BATCH]
            vectors += await asyncio.wrap_future(self._call_on_worker(partial(embed, self._model, batch, self._pad_token_id(), self._pooler)))
        return vectors

    async def reload_weights(self, path: Path) -> None:
        """Same layout, new weights: the worker copies them into the loaded model between
        steps; the chat template is the new folder's (the vocabulary is the same)."""
        path = Path(path)
        check_model_folder(path, self._options.allow_pickle)
        tokenizer, pooler = with_chat_template_of(self._tokenizer, path), Pooler.of(path, self._device)
        await asyncio.wrap_future(self._call_on_worker(partial(self._reload, path)))
        self._path, self._tokenizer, self._pooler = path, tokenizer, pooler

    async def abort(self, request_id: str) -> None:
        sequence = self._in_flight.get(request_id)
        if sequence is not None:
            self._mark_aborted(sequence)

    def process_ids(self) -> list[int]:
        """The model runs in baton's own process."""
        return [os.getpid()]

    def health(self) -> EngineHealth:
        batch, model = self._batch, self._model  # read once: the worker may drop them meanwhile
        is_ready = self._worker is not None and self._worker.is_alive() and not self._is_stopping
        details = {
            "device": str(self._device),
            "dtype": str(model.dtype).removeprefix("torch.") if model else None,
            "max_batch_size": self._options.max_batch_size,
            "decode": batch.rows.describe() if batch else None,
            "prefix_cache": batch.prefixes.describe() if batch and batch.prefixes else None,
            "num_aborted": batch.num_aborted if batch else 0,
            "num_chunked_prefills": batch.num_chunked if batch else 0,
        }
        return EngineHealth(is_ready, batch.num_rows if batch else 0, len(self._waiting), details)

    async def stop(self) -> None:
        """Rule: a stop during the load does not wait for it (a shutdown would wait a load's
        length); the worker, a daemon thread, ends when its load does and drops the model."""
        with self._wakeup:
            self._is_stopping = True
            self._wakeup.notify_all()
        if self._loaded is not None and not self._loaded.done():
            return
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join)
        self._model = self._batch = None
        if torch.cuda.is_available():  # what CUDA graphs and caches hold in cycles goes before the cache is emptied
            gc.collect()
            torch.cuda.empty_cache()
        # On CPU the model's tensors go with their last reference; the heap's collection after
        # every stop takes the rest (a second full walk here held every stream another 0.45 s).

    # -- event-loop side --------------------------------------------------------------

    async def _token_mask(self, output_format: OutputFormat | None) -> TokenMask | None:
        if output_format is None:
            return None
        if self._grammars is None:
            self._grammars = Grammars(self._tokenizer, self._model.config.vocab_size, self._eos_token_ids())
        return await mask_off_loop(self._grammars, output_format)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if self._is_stopping or self._worker is None:
            raise EngineStoppedError("The engine is not running.")
        queue: asyncio.Queue = asyncio.Queue()
        sequence = Sequence(
            request=request,
            detokenizer=IncrementalDetokenizer.for_sampling(self._tokenizer, request.sampling),
            seed=row_seed(request.sampling),
            emit=partial(_put_threadsafe, asyncio.get_running_loop(), queue),
            token_mask=await self._token_mask(request.sampling.output_format),
            thinking=ThinkingCounter(request.sampling.thinking, request.prompt_token_ids) if request.sampling.thinking else None,
        )
        self._in_flight[request.request_id] = sequence
        self._submit(sequence)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            self._in_flight.pop(request.request_id, None)
            self._mark_aborted(sequence)  # a no-op for a finished sequence

    def _call_on_worker(self, work: Callable[[], object]) -> Future:
        """`work` runs on the worker between steps; the future holds what it returns."""
        done: Future = Future()
        with self._wakeup:
            if self._is_stopping:
                raise EngineStoppedError("The engine is not running.")
            self._calls.append((work, done))
            self._wakeup.notify()
        return done

    def _submit(self, sequence: Sequence) -> None:
        with self._wakeup:
            if self._is_stopping:  # stopped or died meanwhile: nobody would take it
                sequence.emit(EngineStoppedError("The engine is not running."))
                return
            bisect.insort(self._waiting, sequence, key=_soonest_first)  # after those of its priority: first come, first served within one
            self._wakeup.notify()

    def _mark_aborted(self, sequence: Sequence) -> None:
        if sequence.finish_reason is None:
            sequence.is_aborted = True
            with self._wakeup:
                self._wakeup.notify()

    # -- worker side --------------------------------------------------------------------

    def _run(self, loaded: Future) -> None:
        """Load, then serve. Rule: every torch call of this engine happens on this one
        thread; OpenMP work spread over threads ran at half speed on a 2-core machine."""
        try:
            self._load()
        except BaseException as error:
            loaded.set_exception(error)
            return
        loaded.set_result(None)
        try:
            self._serve_forever()
        except BaseException as error:  # the worker is dying: nobody may wait on it for ever
            log.exception("the engine's worker for %s died", self._path)
            self._end_everything(EngineStoppedError(f"The engine failed: {error!r}"))
        finally:
            self._model = self._batch = None  # also where no stop() waits for this thread

    def _serve_forever(self) -> None:
        while True:
            joining = self._take_joining()
            if self._is_stopping:
                break
            self._run_calls()
            self._batch.drop_aborted()
            self._admit(joining)
            try:
                if self._batch.prefilling:
                    self._batch.prefill_step()
                if self._batch.sequences:
                    self._batch.step()
            except Exception as error:  # one bad step must not kill the engine for everyone
                self._batch.fail_all(EngineError(f"Generation failed: {error}"))
        self._end_everything()

    def _admit(self, joining: list[Sequence]) -> None:
        """Prefill the newcomers together; if that fails, one by one, so that a prompt no
        engine can run fails its own request only. A failed prefill never touches the
        running batch."""
        if not joining:
            return
        try:
            self._batch.admit(joining)
        except Exception as error:
            if len(joining) > 1:
                for sequence in joining:
                    self._admit([sequence])
                return
            log.warning("prefill failed for request %s: %s", joining[0].request.request_id, error)
            joining[0].emit(EngineError(f"Generation failed: {error}"))

    def _take_joining(self) -> list[Sequence]:
        """Wait for work if idle; return the waiting sequences that may join the batch now."""
        with self._wakeup:
            while not self._is_stopping and not self._batch.num_rows and not self._waiting and not self._calls:
                self._wakeup.wait()
            self._waiting = [s for s in self._waiting if not s.is_aborted]
            if self._calls or (self._batch.sequences and not self._batch.can_join_running):
                return []
            count = num_prefilled_together(self._waiting, self._options.max_batch_size - self._batch.num_rows)
            joining, self._waiting = self._waiting[:count], self._waiting[count:]
            return joining

    def _run_calls(self) -> None:
        with self._wakeup:
            calls, self._calls = self._calls, []
        for work, done in calls:
            try:
                result = work()
            except BaseException as error:
                done.set_exception(error)
            else:
                done.set_result(result)

    def _end_everything(self, error: BaseException | None = None) -> None:
        """Every generation and call still pending ends with `error`; nothing is taken after."""
        error = error or EngineStoppedError("The engine stopped before this generation finished.")
        with self._wakeup:
            self._is_stopping = True
            waiting, self._waiting = self._waiting, []
            calls, self._calls = self._calls, []
        for sequence in waiting:
            sequence.emit(error)
        for _, done in calls:
            done.set_exception(error)
        self._batch.fail_all(error)

    def _reload(self, path: Path) -> None:
        """Rule: every tensor is read and checked before the first one is copied, so a bad
        folder leaves the old weights whole."""
        swapped = EngineStoppedError("The model's weights were swapped before this generation finished.")
        with self._wakeup:
            waiting, self._waiting = self._waiting, []
        for sequence in waiting:
            sequence.emit(swapped)
        self._batch.fail_all(swapped)
        files = [safe_open(file, framework="pt", device=str(self._device)) for file in sorted(path.glob("*.safetensors"))]
        shapes = {name: tuple(f.get_slice(name).get_shape()) for f in files for name in f.keys()}
        params = self._model.state_dict()
        _check_same_tensors(params, shapes)
        adapter = _adapter_of(path, shapes)
        if self._batch.prefixes is not None:  # the old weights' KV
            self._batch.prefixes.clear()
        with torch.no_grad():
            for f in files:
                for name in f.keys():
                    params[name].copy_(f.get_tensor(name))
        if adapter is not None:
            adapter.merge_into(params)
        self._batch.warm_up()

    # -- loading ------------------------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        if self._options.device != "auto":
            return torch.device(self._options.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _load(self) -> None:
        check_model_folder(self._path, self._options.allow_pickle)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self._path, local_files_only=True)
            self._model = AutoModelForCausalLM.from_pretrained(
                self._path,
                dtype=self._torch_dtype(),
                local_files_only=True,
                use_safetensors=None if self._options.allow_pickle else True,
                trust_remote_code=False,
            ).to(self._device)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"Cannot load the model at {self._path}: {error}") from error
        params = self._model.state_dict()
        if (adapter := _adapter_of(self._path, {name: tuple(p.shape) for name, p in params.items()})) is not None:
            adapter.merge_into(params)
        self._model.eval()
        self._pooler = Pooler.of(self._path, self._device)
        rows = self._row_cache()
        prefill_chunk = self._options.prefill_chunk_tokens if rows.can_join_running else 0  # a chunked prompt's row joins the running ones
        self._batch = ContinuousBatch(self._model, rows, self._eos_token_ids(), self._pad_token_id(), self._prefix_cache(), prefill_chunk)
        self._batch.warm_up()

    def _row_cache(self) -> RowCache:
        """On CUDA, a static cache whose decode steps are CUDA graphs (unless turned off);
        elsewhere, and for models it cannot hold, a padded dynamic one, which on CPU attends
        row by row where padding would dominate (row_attention.py)."""
        if self._device.type == "cuda" and self._options.cuda_graphs and can_use_static_rows(self._model):
            return StaticRows(self._model, self._options.max_batch_size, use_graphs=True, first_columns=initial_columns(self.max_model_len))
        on_cpu = self._device.type == "cpu"  # on a GPU, a kernel launch per row and layer costs more than the padding
        return PaddedRows(self._model, per_row=on_cpu and self._options.row_attention and use_row_attention(self._model))

    def _prefix_cache(self) -> PrefixCache | None:
        """Only where every layer's cache is a plain one (a sliding window's keeps no whole prefix)."""
        if not self._options.prefix_cache_bytes or not has_plain_layers(DynamicCache(config=self._model.config)):
            return None
        return PrefixCache(self._options.prefix_cache_bytes)

    def _torch_dtype(self):
        if self._options.dtype != "auto":
            return getattr(torch, self._options.dtype)
        # float16 matmuls are slow on CPU; bfloat16 and float32 are fine.
        on_cpu_in_float16 = self._device.type == "cpu" and config_dtype(read_config(self._path)) == "float16"
        return torch.float32 if on_cpu_in_float16 else "auto"

    def _eos_token_ids(self) -> set[int]:
        ids = self._model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return {i for i in ids + [self._tokenizer.eos_token_id] if i is not None}

    def _pad_token_id(self) -> int:
        pad = self._tokenizer.pad_token_id
        return pad if pad is not None else min(self._eos_token_ids(), default=0)


def _soonest_first(sequence: Sequence) -> int:
    return sequence.request.priority


def _adapter_of(path: Path, shapes: dict[str, tuple[int, ...]]) -> ReadAdapter | None:
    """A version imported as an unmerged LoRA adapter is served merged here (this engine has
    no multi-LoRA): its adapter, read and checked against the weights' shapes."""
    return read_adapter(path / ADAPTER_FOLDER, shapes) if (path / ADAPTER_FOLDER).is_dir() else None


def _check_same_tensors(params: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """The new weights (`shapes`, by name) must cover every parameter (tied ones through the
    tensor they share) with the same shapes, and hold nothing else."""
    if unknown := sorted(set(shapes) - set(params)):
        raise ModelLoadError(f"The new weights hold tensors the model does not have: {', '.join(unknown[:3])}.")
    if wrong := [n for n, shape in shapes.items() if shape != tuple(params[n].shape)]:
        raise ModelLoadError(f"Tensor {wrong[0]} has shape {list(shapes[wrong[0]])}, the model {list(params[wrong[0]].shape)}.")
    loaded = {params[name].data_ptr() for name in shapes}
    if missing := sorted(n for n, t in params.items() if n not in shapes and t.data_ptr() not in loaded):
        raise ModelLoadError(f"The new weights lack tensors the model has: {', '.join(missing[:3])}.")


def _put_threadsafe(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:
        pass  # the loop closed: nobody is listening any more
