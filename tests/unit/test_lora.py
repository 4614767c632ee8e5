"""LoRA adapters merged into their base version: each adapted weight is W + scale * B @ A as
PEFT defines it (checked tensor by tensor against the formula), everything else is the base's
byte for byte, and what a plain merge cannot honour is refused. Imported, the merged version
has the base's layout and names its adapter and base."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.random_model import build_random_adapter
from models.catalog import Change
from models.errors import InvalidRequestError, NotFoundError
from models.importers import import_source
from models.lora import _scale, merge_lora
from models.registry import ImportOptions, Registry

TARGETS = ("q_proj", "v_proj")


def write_adapter(folder: Path, base: Path, rank: int = 4, alpha: int = 8, seed: int = 0, **config) -> Path:
    """A random LoRA adapter for `base`'s attention q and v projections, as PEFT saves one."""
    return build_random_adapter(folder, base, rank, alpha, seed, TARGETS, **config)


def test_each_adapted_weight_is_w_plus_scaled_b_a_and_the_rest_is_the_base(tmp_path, tiny_model_path):
    adapter = write_adapter(tmp_path / "adapter", tiny_model_path)
    merged = merge_lora(adapter, tiny_model_path, tmp_path / "merged")
    base, after, lora = load_file(next(tiny_model_path.glob("*.safetensors"))), load_file(next(merged.glob("*.safetensors"))), load_file(adapter / "adapter_model.safetensors")
    assert after.keys() == base.keys()
    num_adapted = 0
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        if f"base_model.model.{module}.lora_A.weight" in lora:
            delta = lora[f"base_model.model.{module}.lora_B.weight"] @ lora[f"base_model.model.{module}.lora_A.weight"]
            assert torch.allclose(after[name], weight + 2.0 * delta, atol=1e-6)  # alpha 8 / r 4
            assert not torch.equal(after[name], weight)
            num_adapted += 1
        else:
            assert torch.equal(after[name], weight)
    assert num_adapted == 2 * 2  # two layers, q and v
    assert {p.name for p in tiny_model_path.iterdir()} == {p.name for p in merged.iterdir()}
    assert (merged / "config.json").read_text() == (tiny_model_path / "config.json").read_text()


def test_the_scale_is_alpha_over_rank_with_rslora_and_per_layer_patterns():
    config = {"r": 8, "lora_alpha": 16}
    assert _scale(config, "model.layers.0.self_attn.q_proj") == 2.0
    assert _scale({**config, "use_rslora": True}, "model.layers.0.self_attn.q_proj") == 16 / math.sqrt(8)
    patterned = {**config, "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"layers.1.self_attn.q_proj": 4}}
    assert _scale(patterned, "model.layers.0.self_attn.v_proj") == 4.0  # 16 / 4
    assert _scale(patterned, "model.layers.1.self_attn.q_proj") == 0.5  # 4 / 8
    assert _scale(patterned, "model.layers.0.self_attn.q_proj") == 2.0
    assert _scale(patterned, "model.layers.0.self_attn.xv_proj") == 2.0  # a pattern matches whole path parts


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "trained whole modules (lm_head)"),
        ({"bias": "all"}, "trained biases"),
        ({"peft_type": "IA3"}, "a IA3 adapter"),
    ],
)
def test_what_a_plain_merge_cannot_honour_is_refused(tmp_path, tiny_model_path, config, words):
    adapter = write_adapter(tmp_path / "adapter", tiny_model_path, **config)
    with pytest.raises(InvalidRequestError) as refused:
        merge_lora(adapter, tiny_model_path, tmp_path / "merged")
    assert words in str(refused.value) and not (tmp_path / "merged").exists()


def test_an_adapter_trained_on_another_model_is_refused_and_leaves_nothing(tmp_path, tiny_model_path, demo_model_path):
    adapter = write_adapter(tmp_path / "adapter", demo_model_path)  # SmolLM2's shapes, not the tiny model's
    with pytest.raises(InvalidRequestError) as refused:
        merge_lora(adapter, tiny_model_path, tmp_path / "merged")
    assert refused.value.param == "base" and "another model" in str(refused.value)
    assert not (tmp_path / "merged").exists() and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_an_imported_adapter_is_a_version_of_the_bases_layout_naming_adapter_and_base(tmp_path, tiny_model_path):
    registry, change = Registry(tmp_path / "home"), Change("tester")
    base, _ = registry.import_folder(tiny_model_path, "chat", {"kind": "local"}, ImportOptions(engine_options={"engine": "transformers"}), change)
    adapter = write_adapter(tmp_path / "adapter", tiny_model_path)
    merged, is_new = import_source(registry, str(adapter), "chat", ImportOptions(base="chat@1"), change)
    assert (merged.ref, is_new) == ("chat@2", True)
    source = merged.manifest.source
    assert (source["kind"], source["base"], source["adapter"]["path"]) == ("lora", "chat@1", str(adapter.resolve()))
    assert merged.manifest.engine_options == {"engine": "transformers"}  # the base's, unless given
    assert merged.manifest.digest != base.manifest.digest
    again, is_new = import_source(registry, str(adapter), "chat", ImportOptions(base="chat@1"), change)
    assert (again.ref, is_new) == ("chat@2", False)

    with pytest.raises(InvalidRequestError) as refused:
        import_source(registry, str(adapter), "chat", ImportOptions(), change)
    assert refused.value.param == "base" and "--base" in str(refused.value)
    with pytest.raises(InvalidRequestError) as refused:
        import_source(registry, str(tiny_model_path), "chat", ImportOptions(base="chat@1"), change)
    assert refused.value.param == "base"
    with pytest.raises(NotFoundError):
        import_source(registry, str(adapter), "chat", ImportOptions(base="chat@9"), change)
