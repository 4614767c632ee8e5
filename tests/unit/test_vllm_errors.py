"""vLLM's errors as baton passes them on: one that points "above" quotes the engine core's
own error from the output tail, or says where above is; and the rule that picks that error
out of vLLM's log."""

import asyncio
import os

from server.engines.vllm_engine import VLLMEngine, root_cause
from server.observability.output_tail import OutputTail

POINTER = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore_DP0': 1}")

# What vLLM 0.32 (CPU) wrote when a version's config did not match its weights (abridged).
VLLM_START_FAILURE = """\
(EngineCore pid=12011) INFO 11-24 07:07:30 [core.py:105] Initializing a V1 LLM engine
(Worker pid=12023) ERROR 11-24 07:07:37 [multiproc_executor.py:953] WorkerProc failed to start.
(Worker pid=12023) ERROR 11-24 07:07:37 [multiproc_executor.py:953] Traceback (most recent call last):
(Worker pid=12023) ERROR 11-24 07:07:37 [multiproc_executor.py:953]   File "vllm/model_executor/models/utils.py", line 476, in load_weights
(Worker pid=12023) ERROR 11-24 07:07:37 [multiproc_executor.py:953]     raise RuntimeError(
(Worker pid=12023) ERROR 11-24 07:07:37 [multiproc_executor.py:953] RuntimeError: start (0) + length (1024) exceeds dimension size (512).
(EngineCore pid=12011) ERROR 11-24 07:07:39 [core.py:1510] EngineCore failed to start.
(EngineCore pid=12011) ERROR 11-24 07:07:39 [core.py:1510] Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
Process EngineCore:
Traceback (most recent call last):
Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
"""


def test_without_a_tail_a_failed_engine_core_start_points_to_the_server_log(tmp_path):
    engine = VLLMEngine(tmp_path)
    said = asyncio.run(engine._where_the_cause_is(POINTER, 0))
    assert said.startswith("Engine core initialization failed") and "in the baton server's log" in said
    assert asyncio.run(engine._where_the_cause_is(ValueError("No config.json"), 0)) == "No config.json"


def test_with_a_tail_the_engine_cores_own_error_is_quoted(tmp_path):
    spare = os.open(os.devnull, os.O_WRONLY)  # a descriptor of its own: the tail takes it over, not stdout
    tail = OutputTail()
    tail.install(fds=(spare,))
    start = tail.position()
    os.write(spare, VLLM_START_FAILURE.encode())
    said = asyncio.run(VLLMEngine(tmp_path, output_tail=tail)._where_the_cause_is(POINTER, start))
    assert said.startswith("RuntimeError: start (0) + length (1024) exceeds dimension size (512). (the engine core's error; Engine core initialization failed"), said
    os.close(spare)


def test_the_root_cause_is_the_first_exception_that_is_not_a_pointer_to_another():
    assert root_cause(VLLM_START_FAILURE.splitlines()) == "RuntimeError: start (0) + length (1024) exceeds dimension size (512)."
    memory = "(EngineCore pid=7) ERROR 11-24 07:07:39 [core.py:1510] ValueError: Free memory on device (10.9/79.2 GiB) on startup is less than desired GPU memory utilization (0.85, 67.3 GiB)."
    assert root_cause(["(EngineCore pid=7) ERROR 11-24 07:07:39 [core.py:1510]     raise ValueError(", memory]).startswith("ValueError: Free memory on device")
    assert root_cause(["torch.OutOfMemoryError: CUDA out of memory."]) == "torch.OutOfMemoryError: CUDA out of memory."
    assert root_cause(["RuntimeError: Engine core initialization failed. See root cause above.", "INFO all is well"]) is None
