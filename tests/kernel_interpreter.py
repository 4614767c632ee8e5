"""Runs `kernels.sampling_triton.launch` under Triton's interpreter, in a child process.

Triton reads TRITON_INTERPRET when it is first imported, and a test process has imported it
long before (transformers does), so the kernel runs in a process of its own: one JSON line
of arguments in, one JSON line of chosen token ids out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

ARGUMENTS = ("logits", "temperatures", "top_ps", "seeds", "steps")


class InterpretedKernel:
    """Called like `launch`: tensors in, the chosen ids (int64) out."""

    def __init__(self):
        environment = {**os.environ, "TRITON_INTERPRET": "1"}
        self._child = subprocess.Popen(
            [sys.executable, "-m", "tests.kernel_interpreter"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment, text=True
        )

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        self._child.stdin.write(json.dumps({name: t.tolist() for name, t in zip(ARGUMENTS, tensors, strict=True)}) + "\n")
        self._child.stdin.flush()
        answer = self._child.stdout.readline()
        if not answer:
            raise RuntimeError(f"the kernel's process ended (exit code {self._child.wait()})")
        return torch.tensor(json.loads(answer), dtype=torch.int64)

    def close(self) -> None:
        self._child.stdin.close()
        self._child.wait(timeout=30)
        self._child.stdout.close()


def _serve() -> None:
    from kernels.sampling_triton import launch

    dtypes = {"seeds": torch.int64, "steps": torch.int64}
    for line in sys.stdin:
        arguments = json.loads(line)
        tensors = [torch.tensor(arguments[name], dtype=dtypes.get(name, torch.float32)) for name in ARGUMENTS]
        print(json.dumps(launch(*tensors).tolist()), flush=True)


if __name__ == "__main__":
    _serve()
