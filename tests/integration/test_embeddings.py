"""`/v1/embeddings` through the official client (which asks for base64) and plain HTTP on
the transformers engine: each vector is the model's last hidden state of the last token,
unit length, the same whether an input is embedded alone or beside longer ones; the errors
are OpenAI-shaped 400s. (tests/vllm checks vLLM's pooling runner against the same vectors.)"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from models.errors import ModelLoadError
from server.config.settings import ModelSpec, Settings
from server.engines.pooling import Dense, Pooler, Pooling, embed, load_projection, pooling_of
from tests.conftest import ServerThread, build_tiny_model, sentence_transformers_layout, sentence_transformers_vector


def model_vector(model_path, token_ids: list[int]) -> list[float]:
    """The model run on one input alone: its base's last hidden state at the last token, unit length."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.inference_mode():
        state = model.base_model(input_ids=torch.tensor([token_ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(state, dim=-1).tolist()


def test_an_embedding_is_the_models_last_state_of_the_last_token_at_unit_length(tiny_client, tiny_model_path, tiny_tokenizer):
    answer = tiny_client.embeddings.create(model="tiny", input="The sea is deep")
    (item,) = answer.data
    expected = model_vector(tiny_model_path, tiny_tokenizer.encode("The sea is deep"))
    assert item.embedding == pytest.approx(expected, abs=1e-4)
    assert math.isclose(sum(x * x for x in item.embedding), 1.0, rel_tol=1e-4)
    assert (answer.model, answer.usage.prompt_tokens, answer.usage.total_tokens) == ("tiny", len(tiny_tokenizer.encode("The sea is deep")), answer.usage.prompt_tokens)


def test_inputs_embedded_together_are_each_embedded_as_alone_in_order(tiny_client, tiny_server, tiny_tokenizer):
    """Inputs of different lengths share a left-padded batch; token-id inputs are taken as they are."""
    texts = ["Hi", "A much longer input than the first one, by a fair margin", "Mid sized"]
    together = tiny_client.embeddings.create(model="tiny", input=texts).data
    alone = [tiny_client.embeddings.create(model="tiny", input=text).data[0].embedding for text in texts]
    assert [item.index for item in together] == [0, 1, 2]
    for item, single in zip(together, alone):
        assert item.embedding == pytest.approx(single, abs=1e-4)
    as_ids = tiny_client.embeddings.create(model="tiny", input=[tiny_tokenizer.encode(text) for text in texts]).data
    assert as_ids[1].embedding == pytest.approx(alone[1], abs=1e-4)
    floats = httpx.post(f"{tiny_server.url}/v1/embeddings", json={"model": "tiny", "input": texts[0], "encoding_format": "float"})
    assert floats.json()["data"][0]["embedding"] == pytest.approx(alone[0], abs=1e-6)
    assert floats.headers["x-baton-deployment"] == "tiny"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [1, 10**9]}, "input"),
        ({"input": "word " * 5000}, "input"),
        ({"input": "Hi", "dimensions": 8}, "dimensions"),
        ({"input": "Hi", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(tiny_server, body, param):
    refused = httpx.post(f"{tiny_server.url}/v1/embeddings", json={"model": "tiny", **body})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == param


def test_an_unknown_model_is_a_404(tiny_server):
    refused = httpx.post(f"{tiny_server.url}/v1/embeddings", json={"model": "nope", "input": "Hi"})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"


def test_pooling_is_read_from_sentence_transformers_modules_as_vllm_reads_it(tmp_path):
    assert pooling_of(tmp_path) == Pooling("last", normalize=True)  # no modules.json: a causal LM, last token, unit length
    (tmp_path / "1_Pooling").mkdir()
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"}, {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    normalized = [*modules, {"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    cases = [
        (normalized, {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, Pooling("mean", True)),
        (normalized, {"pooling_mode_cls_token": True}, Pooling("first", True)),
        (modules, {"pooling_mode_lasttoken": True}, Pooling("last", False)),  # no Normalize module: not scaled
        (normalized, {"pooling_mode": "lasttoken"}, Pooling("last", True)),
        (normalized, {"pooling_mode_max_tokens": True}, Pooling("last", True)),  # unknown to baton: the last token
    ]
    for listed, config, expected in cases:
        (tmp_path / "modules.json").write_text(json.dumps(listed))
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
        assert pooling_of(tmp_path) == expected, config
    (tmp_path / "modules.json").write_text("not json")
    assert pooling_of(tmp_path) == Pooling()


@pytest.mark.parametrize("mode", ["mean", "first", "last"])
@pytest.mark.parametrize("normalize", [True, False])
def test_each_pooling_reads_only_its_own_inputs_tokens_in_a_padded_batch(tiny_model_path, mode, normalize):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    pooled = embed(model, prompts, pad_token_id=0, pooler=Pooler(Pooling(mode, normalize)))
    for prompt, vector in zip(prompts, pooled):
        with torch.inference_mode():
            states = model.base_model(input_ids=torch.tensor([prompt])).last_hidden_state[0]
        alone = {"mean": states.mean(dim=0), "first": states[0], "last": states[-1]}[mode]
        assert vector == pytest.approx((torch.nn.functional.normalize(alone, dim=-1) if normalize else alone).tolist(), abs=1e-4)


def test_a_dense_layer_is_read_from_the_modules_in_their_order(tmp_path, demo_model_path):
    folder = sentence_transformers_layout(build_tiny_model(tmp_path / "st", demo_model_path), {"pooling_mode_mean_tokens": True}, dense_out=8)
    assert pooling_of(folder) == Pooling("mean", True, (Dense("2_Dense", "Tanh"),))
    config = json.loads((folder / "2_Dense" / "config.json").read_text())
    for activation, words in (("torch.nn.modules.activation.Softmax", "uses the activation Softmax"), ("Tanh", None)):
        (folder / "2_Dense" / "config.json").write_text(json.dumps({**config, "activation_function": activation}))
        if words is None:
            assert len(load_projection(folder, pooling_of(folder), torch.device("cpu")).layers) == 1
        else:
            with pytest.raises(ModelLoadError, match=words):
                load_projection(folder, pooling_of(folder), torch.device("cpu"))
    (folder / "2_Dense" / "model.safetensors").rename(folder / "2_Dense" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled weights are not read"):
        load_projection(folder, pooling_of(folder), torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="inside the model folder"):
        load_projection(folder, Pooling(dense=(Dense("../elsewhere", "Tanh"),)), torch.device("cpu"))


def test_the_transformers_engine_projects_through_a_dense_layer_as_sentence_transformers(tmp_path, demo_model_path, tiny_tokenizer):
    """Pooled, then the Dense layer (to 8 numbers, Tanh), then unit length: vLLM's ST projector
    (tests/vllm checks vLLM's vectors against the same reference)."""
    folder = sentence_transformers_layout(build_tiny_model(tmp_path / "st", demo_model_path), {"pooling_mode_mean_tokens": True}, dense_out=8)
    with ServerThread(Settings(home=tmp_path / "home", models=[ModelSpec(name="st", path=folder, engine="transformers")])) as server:
        vectors = server.client().embeddings.create(model="st", input=["The sea is deep", "Hi"]).data
    for text, item in zip(["The sea is deep", "Hi"], vectors):
        assert item.embedding == pytest.approx(sentence_transformers_vector(folder, tiny_tokenizer.encode(text)), abs=1e-4)
        assert len(item.embedding) == 8
