"""The output tail, in a real child process that installs it (fds 1 and 2 are process-wide):
every byte still reaches the original stdout or stderr, grandchildren's lines included, and
the lines kept are those after a position. And the rule that picks vLLM's root cause out of
its log."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from server.engines.vllm_engine import root_cause

CHILD = textwrap.dedent(
    """
    import json, subprocess, sys, time
    from server.observability.output_tail import OutputTail
    tail = OutputTail(max_lines=4)  # 'before install' never kept; 'first' the oldest kept
    print("before install", file=sys.stderr, flush=True)
    tail.install()
    print("first", file=sys.stderr, flush=True)
    time.sleep(0.3)  # a position counts the lines read so far, not those written
    start = tail.position()
    subprocess.run([sys.executable, "-c", "import sys; print('logged', flush=True); sys.stderr.write('from a child\\\\nsecond line')"])
    print(" ends here", file=sys.stderr, flush=True)
    time.sleep(0.3)
    print(json.dumps({"since": tail.lines_since(start), "all": tail.lines_since(0)}))
    tail.close()  # the last line is still in the pipe: passed on before the process ends
    """
)


def test_every_line_reaches_its_stream_and_the_lines_after_a_position_are_kept():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stderr == "before install\nfirst\nfrom a child\nsecond line ends here\n"
    logged, printed = done.stdout.splitlines()
    kept = json.loads(printed)
    new_lines = ["from a child", "logged", "second line ends here"]  # each stream in order; the two interleave as read
    assert logged == "logged" and sorted(kept["since"]) == new_lines
    assert kept["all"][0] == "first" and sorted(kept["all"][1:]) == new_lines


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


def test_the_root_cause_is_the_first_exception_that_is_not_a_pointer_to_another():
    assert root_cause(VLLM_START_FAILURE.splitlines()) == "RuntimeError: start (0) + length (1024) exceeds dimension size (512)."
    memory = "(EngineCore pid=7) ERROR 11-24 07:07:39 [core.py:1510] ValueError: Free memory on device (10.9/79.2 GiB) on startup is less than desired GPU memory utilization (0.85, 67.3 GiB)."
    assert root_cause(["(EngineCore pid=7) ERROR 11-24 07:07:39 [core.py:1510]     raise ValueError(", memory]).startswith("ValueError: Free memory on device")
    assert root_cause(["torch.OutOfMemoryError: CUDA out of memory."]) == "torch.OutOfMemoryError: CUDA out of memory."
    assert root_cause(["RuntimeError: Engine core initialization failed. See root cause above.", "INFO all is well"]) is None
