from __future__ import annotations

import json
import logging

from server.engines.generation_config import SamplingDefaults


def test_a_models_sampling_keys_become_its_defaults():
    qwen = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": [151645, 151643], "max_new_tokens": 512}
    defaults = SamplingDefaults.of(qwen)
    assert defaults == SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20, max_tokens=512)
    assert defaults.as_dict() == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 512}


def test_values_that_repeat_transformers_defaults_choose_nothing():
    """As vLLM's server reads the file (transformers' `to_diff_dict`): top_k 50 is what
    transformers assumes when a file says nothing, not the model's choice."""
    assert SamplingDefaults.of({"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}) == SamplingDefaults()
    assert SamplingDefaults.of({"top_k": 40, "repetition_penalty": 1.1, "min_p": 0.05}).as_dict() == {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1}


def test_a_value_out_of_bounds_or_of_the_wrong_type_is_left_out_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        defaults = SamplingDefaults.of({"temperature": -1, "top_p": 0, "top_k": 2.5, "min_p": "0.1", "repetition_penalty": 0, "max_new_tokens": True, "presence_penalty": 0.5})
    assert defaults == SamplingDefaults(presence_penalty=0.5)
    assert len(caplog.records) == 6 and "temperature=-1" in caplog.text


def test_a_folder_without_a_readable_config_has_no_defaults(tmp_path):
    assert SamplingDefaults.read(tmp_path) == SamplingDefaults()
    (tmp_path / "generation_config.json").write_text("{not json")
    assert SamplingDefaults.read(tmp_path) == SamplingDefaults()
    (tmp_path / "generation_config.json").write_text(json.dumps([1, 2]))
    assert SamplingDefaults.read(tmp_path) == SamplingDefaults()
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "bos_token_id": 1}))
    assert SamplingDefaults.read(tmp_path) == SamplingDefaults(temperature=0.3)
