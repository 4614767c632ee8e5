"""Reload compatibility from two layouts: read from real folders, compared without a model."""

import json
import shutil

import pytest

from server.deployments.layout import ModelLayout, reload_blocker
from tests.conftest import build_tiny_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory, demo_model_path):
    root = tmp_path_factory.mktemp("layouts")
    return {
        "a": build_tiny_model(root / "a", demo_model_path, seed=0),
        "b": build_tiny_model(root / "b", demo_model_path, seed=1),
        "wide": build_tiny_model(root / "wide", demo_model_path, seed=0, intermediate_size=256),
    }


def _copy(folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def test_same_shapes_with_other_weights_reload(folders):
    assert reload_blocker(ModelLayout.read(folders["a"]), ModelLayout.read(folders["b"]), {}, {}) is None


def test_another_tensor_shape_names_the_tensor_and_both_shapes(folders):
    reason = reload_blocker(ModelLayout.read(folders["a"]), ModelLayout.read(folders["wide"]), {}, {})
    assert reason == "tensor model.layers.0.mlp.down_proj.weight: F32[64, 128] -> F32[64, 256]"


def test_another_architecture_is_named_first(folders, tmp_path):
    other = _copy(folders["b"], tmp_path)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    reason = reload_blocker(ModelLayout.read(folders["a"]), ModelLayout.read(other), {}, {})
    assert reason == "the architecture differs (LlamaForCausalLM -> MistralForCausalLM)"


def test_a_config_value_that_changes_the_network_blocks_but_provenance_does_not(folders, tmp_path):
    other = _copy(folders["b"], tmp_path)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "_name_or_path": "elsewhere", "transformers_version": "9.9"}))
    assert reload_blocker(ModelLayout.read(folders["a"]), ModelLayout.read(other), {}, {}) is None
    (other / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    assert reload_blocker(ModelLayout.read(folders["a"]), ModelLayout.read(other), {}, {}).startswith("config.json rope_theta:")


def test_another_tokenizer_blocks(folders, tmp_path):
    other = _copy(folders["b"], tmp_path)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|end|>"', 1))
    assert reload_blocker(ModelLayout.read(folders["a"]), ModelLayout.read(other), {}, {}) == "the tokenizer differs"


def test_other_stop_tokens_block_but_other_sampling_defaults_do_not(folders, tmp_path):
    other = _copy(folders["b"], tmp_path)
    generation = json.loads((other / "generation_config.json").read_text())
    (other / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.3}))
    assert reload_blocker(ModelLayout.read(folders["a"]), ModelLayout.read(other), {}, {}) is None
    (other / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 7}))
    assert reload_blocker(ModelLayout.read(folders["a"]), ModelLayout.read(other), {}, {}) == "generation_config.json eos_token_id: 2 -> 7"


def test_other_engine_options_block(folders):
    layout_a, layout_b = ModelLayout.read(folders["a"]), ModelLayout.read(folders["b"])
    reason = reload_blocker(layout_a, layout_b, {"engine": "vllm"}, {"engine": "vllm", "max_model_len": 512})
    assert reason == "engine option max_model_len: absent -> 512"
    assert reload_blocker(layout_a, layout_b, {"tool_parser": "hermes"}, {"tool_parser": "mistral"}) is None  # read by the API, not the engine


def test_a_folder_without_safetensors_never_reloads(folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(folders["a"] / "config.json", empty / "config.json")
    assert "no safetensors" in reload_blocker(ModelLayout.read(folders["a"]), ModelLayout.read(empty), {}, {})


def test_other_sentence_transformers_modules_block_a_reload(folders, tmp_path):
    """vLLM builds its pooler and Dense projection at start: a reload would keep the old ones."""
    first, second = _copy(folders["a"], tmp_path / "first"), _copy(folders["b"], tmp_path / "second")
    for folder in (first, second):
        (folder / "modules.json").write_text(json.dumps([{"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert reload_blocker(ModelLayout.read(first), ModelLayout.read(second), {}, {}) is None
    (second / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    assert reload_blocker(ModelLayout.read(first), ModelLayout.read(second), {}, {}).startswith("the sentence-transformers modules differ")
    assert reload_blocker(ModelLayout.read(first), ModelLayout.read(folders["b"]), {}, {}).startswith("the sentence-transformers modules differ")
