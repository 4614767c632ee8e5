"""Engine options as a version records them: known names, strict types, per-engine views."""

from dataclasses import replace
from pathlib import Path

import pytest

from models.errors import InvalidRequestError
from server.deployments.slot import Target
from server.deployments.slot_lifecycle import served_name
from server.engines.options import TransformersOptions, VLLMOptions, check_engine_options, options_for


def test_sleep_mode_is_a_vllm_option_on_by_default_and_off_when_asked():
    check_engine_options({"engine": "vllm", "sleep_mode": False})
    assert VLLMOptions().sleep_mode is True
    assert options_for(VLLMOptions, {"sleep_mode": False, "max_batch_size": 4}).sleep_mode is False


def test_an_option_of_the_wrong_type_is_refused_naming_it():
    with pytest.raises(InvalidRequestError, match="sleep_mode") as refused:
        check_engine_options({"sleep_mode": "no"})
    assert refused.value.param == "engine_options.sleep_mode"


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_batch_size", 0), ("max_model_len", -5), ("max_num_seqs", 0), ("tensor_parallel_size", 0), ("gpu_memory_utilization", 1.5), ("gpu_memory_utilization", 0.0), ("prefix_cache_mib", -1)],
)
def test_a_size_no_engine_can_start_with_is_refused_before_any_starts(name, value):
    with pytest.raises(InvalidRequestError, match=name) as refused:
        check_engine_options({name: value})
    assert refused.value.param == f"engine_options.{name}"
    check_engine_options({name: 1 if isinstance(value, int) else 0.5})


@pytest.mark.parametrize("engine", ["vllm", "transformers", "auto"])
def test_a_dtype_is_one_both_engines_know_whichever_engine_is_named(engine):
    """vLLM's dtype was any string: float64 was recorded and failed the engine's start."""
    with pytest.raises(InvalidRequestError, match="dtype"):
        check_engine_options({"engine": engine, "dtype": "float64"})
    check_engine_options({"engine": engine, "dtype": "bfloat16"})


def test_each_engine_sees_only_its_own_options():
    options = {"engine": "vllm", "max_batch_size": 4, "max_num_seqs": 8}
    assert options_for(TransformersOptions, options).max_batch_size == 4
    assert options_for(VLLMOptions, options).max_num_seqs == 8


def test_multi_gpu_and_multi_node_options_are_vllms_own():
    check_engine_options({"engine": "vllm", "tensor_parallel_size": 8, "pipeline_parallel_size": 2, "distributed_executor_backend": "ray"})
    with pytest.raises(InvalidRequestError, match="distributed_executor_backend"):
        check_engine_options({"distributed_executor_backend": "slurm"})


@pytest.mark.parametrize(
    ("speculation", "param"),
    [
        ({"method": "ngram", "num_speculative_tokens": 4, "model": "/models/draft"}, "speculative_config.model"),  # a draft from outside the registry
        ({"method": "eagle", "num_speculative_tokens": 4}, "speculative_config.method"),
        ({"method": "ngram"}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
        ("ngram", "speculative_config"),
    ],
)
def test_speculative_decoding_is_vllms_prompt_lookup_alone(speculation, param):
    with pytest.raises(InvalidRequestError) as refused:
        check_engine_options({"speculative_config": speculation})
    assert refused.value.param == f"engine_options.{param}"
    lookup = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
    check_engine_options({"speculative_config": lookup, "kv_cache_dtype": "fp8", "max_num_batched_tokens": 512, "enable_prefix_caching": False})
    assert options_for(VLLMOptions, {"speculative_config": lookup}).speculative_config == lookup  # the dict vLLM takes


@pytest.mark.parametrize("name", ["allow_pickle", "served_name"])
def test_what_baton_sets_itself_is_no_engine_option(name):
    with pytest.raises(InvalidRequestError, match=name):
        check_engine_options({name: "x"})


def test_an_engine_names_its_model_by_version_or_folder_never_by_path():
    assert served_name(Target("chat@2", Path("/home/baton/store/trees/ab12"), {}, 0)) == "chat@2"
    assert served_name(Target("local", Path("/models/my-tune"), {}, 0)) == "my-tune"
    # An engine that a base's versions share is named after the base, whichever version starts it.
    adapter = Target("chat@5", Path("/s/trees/ab12"), {}, 0, adapter=Path("/s/trees/cd34/adapter"), adapter_base="chat@3", shared_engine_key="k")
    assert served_name(adapter) == "chat@3"
    assert served_name(Target("chat@3", Path("/s/trees/ab12"), {}, 0, shared_engine_key="k")) == "chat@3"
    # An adapter merged as it loads (no shared engine) is its own model.
    assert served_name(replace(adapter, shared_engine_key=None)) == "chat@5"
