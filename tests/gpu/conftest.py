"""Shared by the GPU tests (each skipped without CUDA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tokenizer_source(request) -> Path:
    """SmolLM2's tokenizer: $BATON_GPU_TOKENIZER (the offline bundle's node/tok), else the demo model."""
    folder = os.environ.get("BATON_GPU_TOKENIZER")
    return Path(folder) if folder else request.getfixturevalue("demo_model_path")
