"""The process's standard output and error as they pass, with their last lines kept.

An engine that runs in child processes (vLLM's engine core and workers) logs why it could not
start to the stdout and stderr it inherited (vLLM's logger writes to stdout, Python's
tracebacks to stderr), then exits; the exception its parent raises says only "see root cause
above", and a caller of the admin API has no "above". With the tail installed, file
descriptors 1 and 2 are pipes: a reader thread per pipe copies every byte on to the original
(nothing is lost; each stream keeps its order) and keeps the last lines, so the engine can
quote its cause to whoever asked for the start.

Rules: installed once, by `baton serve` (a process-wide change of fds 1 and 2, made before any
engine starts so that every child inherits the pipes); the readers never write to the pipes
themselves; positions count lines since install, so a start reads only what came after it
began (lines of both streams, in the order they were read).
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque

MAX_LINES = 5000  # a vLLM start's traceback is a few hundred lines


class OutputTail:
    def __init__(self, max_lines: int = MAX_LINES) -> None:
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._num_lines = 0
        self._lock = threading.Lock()
        self._originals: dict[int, int] = {}
        self._readers: list[threading.Thread] = []

    def install(self, fds: tuple[int, ...] = (1, 2)) -> None:
        """From now on, `fds` (this process's and its future children's) pass through here."""
        for fd in fds:
            self._originals[fd] = original = os.dup(fd)
            reader, writer = os.pipe()
            os.dup2(writer, fd)
            os.close(writer)
            self._readers.append(threading.Thread(target=self._copy, args=(reader, original), name=f"output-tail-{fd}", daemon=True))
            self._readers[-1].start()

    def close(self, timeout_s: float = 2.0) -> None:
        """At exit: the fds are the originals again, and what is still in the pipes is passed
        on (a reader ends once no process writes to its pipe; children still running keep it
        open, so it is waited for at most `timeout_s`)."""
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in self._originals.items():
            os.dup2(original, fd)
        for reader in self._readers:
            reader.join(timeout_s)

    def position(self) -> int:
        """Lines seen so far: what `lines_since` takes."""
        with self._lock:
            return self._num_lines

    def lines_since(self, position: int) -> list[str]:
        """The complete lines written after `position` (the oldest may have been dropped)."""
        with self._lock:
            num_new = min(self._num_lines - position, len(self._lines))
            return list(self._lines)[len(self._lines) - num_new :] if num_new > 0 else []

    def _copy(self, reader: int, original: int) -> None:
        """Until every writer has closed the pipe. Rule: the pipe is always drained, even once
        the original fails (a closed terminal), or every writer would block on it."""
        partial, forwarding = b"", True
        while chunk := os.read(reader, 65536):
            forwarding = forwarding and _write_all(original, chunk)
            *complete, partial = (partial + chunk).split(b"\n")
            if complete:
                with self._lock:
                    self._lines.extend(line.decode(errors="replace") for line in complete)
                    self._num_lines += len(complete)


def _write_all(fd: int, data: bytes) -> bool:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        return False
    return True
