"""Llama models with random weights and SmolLM2's tokenizer, built where they run: real code
paths and real sizes, with nothing downloaded (GPU nodes have no network).

    python benchmarks/random_model.py OUT --shape 1b --tokenizer FOLDER [--seed 0] [--dtype bfloat16]

Shapes: `tiny` (2 layers, for CPU tests), `smol` (SmolLM2-135M's), `1b` (a 1B Llama of the
same family). The tokenizer folder is any SmolLM2 checkout (the demo model, or the GPU
bundle's node/tok).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
BASE = dict(
    vocab_size=49152,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=True,
)
# A large init spread in `tiny` keeps greedy choices far from ties.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5),
    "smol": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, initializer_range=0.02),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, initializer_range=0.02),
}


def build_random_llama(target: Path, tokenizer_source: Path, seed: int = 0, dtype: str = "float32", shape: str = "tiny", **fields) -> Path:
    """A Llama of `shape` (fields override it) with weights drawn from `seed`, saved as
    safetensors in `dtype` beside SmolLM2's tokenizer files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**(BASE | SHAPES[shape] | fields))
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(target)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_source / name, target / name)
    return target


def build_random_adapter(folder: Path, base: Path, rank: int = 4, alpha: int = 8, seed: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj"), **config) -> Path:
    """A random LoRA adapter for `base`'s attention projections `targets`, as PEFT saves one
    (`config` adds adapter_config.json fields)."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(shard, "pt") as weights:
            for name in weights.keys():
                if name.endswith(tuple(f"{target}.weight" for target in targets)):
                    out_features, in_features = weights.get_slice(name).get_shape()
                    module = name.removesuffix(".weight")
                    tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
                    tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none", **config}
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with SmolLM2's tokenizer files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    print(build_random_llama(args.out, args.tokenizer, args.seed, args.dtype, args.shape))


if __name__ == "__main__":
    main()
