"""A LoRA fine-tune as a version: imported with its base, it has the base's layout, so a
swap to it under streaming load is a `reload` (no engine starts), nothing fails, and greedy
answers afterwards are those of the merged model; rollback restores the base's."""

from __future__ import annotations

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.catalog import Change
from models.importers import import_source
from models.registry import ImportOptions, Registry
from server.config.settings import ModelSpec, Settings
from tests.conftest import ServerThread, streaming_versions_during
from tests.unit.test_lora import write_adapter

HELLO = [{"role": "user", "content": "Hello"}]


def _greedy_ids(folder, prompt_ids: list[int], max_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        return model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(prompt_ids) :].tolist()


def test_a_lora_fine_tune_swaps_in_as_a_reload_under_load_and_answers_as_the_merged_model(tmp_path, tiny_model_path):
    home, change = tmp_path / "home", Change("tester")
    registry = Registry(home)
    registry.import_folder(tiny_model_path, "chat", {"kind": "local"}, ImportOptions(), change)
    adapter = write_adapter(tmp_path / "adapter", tiny_model_path, alpha=64)  # strong enough to change greedy answers
    merged, _ = import_source(registry, str(adapter), "chat", ImportOptions(base="chat@1"), change)
    spec = ModelSpec(name="chat", path=registry.resolve("chat@1").path, version="chat@1", engine="transformers")
    with ServerThread(Settings(home=home, models=[spec])) as server:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
        prompt = tokenizer.encode("The sea is")

        before = server.client().completions.create(model="chat", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        swap = lambda: httpx.post(f"{server.url}/admin/deployments/chat/swap", json={"to": merged.ref}, timeout=300).json()  # noqa: E731
        record, versions, errors = streaming_versions_during(server, "chat", HELLO, swap)
        assert (record["status"], record["strategy"]) == ("succeeded", "reload"), record
        assert errors == [] and {"chat@1", "chat@2"} <= set(versions)
        after = server.client().completions.create(model="chat", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        assert after == tokenizer.decode(_greedy_ids(merged.path, prompt, 8)) and after != before
        back = httpx.post(f"{server.url}/admin/deployments/chat/rollback", json={}, timeout=300).json()
        assert (back["status"], back["strategy"]) == ("succeeded", "reload"), back
        assert server.client().completions.create(model="chat", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}).choices[0].text == before
