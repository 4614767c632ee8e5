"""The output tail, in a real child process that installs it (fds 1 and 2 are process-wide):
every byte still reaches the original stdout or stderr, grandchildren's lines included, and
the lines kept are those after a position."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

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
