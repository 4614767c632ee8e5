"""GGUF to a safetensors Hugging Face folder, through transformers' GGUF reader."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from models.errors import ModelLoadError


def convert_gguf(gguf_file: Path, target: Path, dtype: str = "bfloat16") -> Path:
    """Dequantize `gguf_file` into `target` (config, safetensors weights, tokenizer).

    Rule: `target` appears whole or not at all; the work happens in a sibling temporary
    folder that is renamed into place at the end.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=getattr(torch, dtype))
        except (ValueError, KeyError, OSError) as error:  # not GGUF, or an architecture transformers cannot read
            raise ModelLoadError(f"Cannot convert {gguf_file.name}: {error}") from error
        # The weights are dequantized now: save them as a plain model, not a GGUF-quantized one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
