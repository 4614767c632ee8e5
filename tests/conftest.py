"""Shared test parts: real models (a tiny random one, the bundled SmolLM2) and a real
uvicorn server on a free port, driven by the official openai client."""

from __future__ import annotations

import json

import os
import threading
import time
from pathlib import Path

import anthropic
import openai
import pytest
import uvicorn

from benchmarks.random_model import build_random_llama
from models.catalog import Change
from models.demo import ensure_demo_model
from models.registry import ImportOptions, Registry
from server.app import create_app
from server.config.settings import ModelSpec, Settings, default_home



@pytest.fixture(scope="session")
def demo_version():
    """SmolLM2-135M-Instruct, imported from its GGUF into the registry (`make test` does it first)."""
    return ensure_demo_model(Registry(Path(os.environ.get("BATON_HOME") or default_home())))


@pytest.fixture(scope="session")
def demo_model_path(demo_version) -> Path:
    return demo_version.path


@pytest.fixture(scope="session")
def two_versions_home(tmp_path_factory, tiny_model_path, demo_model_path):
    """A fresh registry home with a factory: each call makes one holding chat@1 (the tiny
    model) and chat@2 (the same layout, other random weights)."""
    second = build_tiny_model(tmp_path_factory.mktemp("chat2") / "chat2", demo_model_path, seed=1)

    def make() -> Path:
        home = tmp_path_factory.mktemp("home")
        registry = Registry(home)
        for folder in (tiny_model_path, second):
            registry.import_folder(folder, "chat", {"kind": "local"}, ImportOptions(), Change("tester"))
        return home

    return make


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, demo_model_path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", demo_model_path)


def copy_with(source: Path, target: Path, generation_config: dict | None = None, chat_template: str | None = None) -> Path:
    """A copy of a model folder with more generation config keys, or another chat template:
    another version of the same layout (a swap between the two is a reload)."""
    import shutil

    shutil.copytree(source, target)
    if generation_config is not None:
        path = target / "generation_config.json"
        path.chmod(0o644)
        path.write_text(json.dumps(json.loads(path.read_text()) | generation_config))
    if chat_template is not None:
        (target / "chat_template.jinja").chmod(0o644)
        (target / "chat_template.jinja").write_text(chat_template)
    return target


def build_tiny_model(target: Path, tokenizer_source: Path, seed: int = 0, **shape) -> Path:
    """A 2-layer Llama with random float32 weights and SmolLM2's tokenizer: real code paths,
    milliseconds per token. `shape` overrides config fields (another layout, or head sizes
    vLLM's kernels take)."""
    return build_random_llama(target, tokenizer_source, seed, "float32", "tiny", **shape)


def sentence_transformers_layout(folder: Path, pooling: dict, dense_out: int | None = None, activation: str = "torch.nn.modules.activation.Tanh", dense_seed: int = 0) -> Path:
    """Give a model folder sentence-transformers' modules: Transformer, Pooling (`pooling` is
    its config), a Dense layer to `dense_out` numbers when given (random weights from
    `dense_seed`), then Normalize, as embedding models built on a causal LM ship."""
    import torch
    from safetensors.torch import save_file

    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden, **pooling}))
    if dense_out is not None:
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        (folder / "2_Dense").mkdir()
        (folder / "2_Dense" / "config.json").write_text(json.dumps({"in_features": hidden, "out_features": dense_out, "bias": True, "activation_function": activation}))
        generator = torch.Generator().manual_seed(dense_seed)
        weights = {"linear.weight": torch.randn(dense_out, hidden, generator=generator) / hidden**0.5, "linear.bias": torch.randn(dense_out, generator=generator)}
        save_file(weights, folder / "2_Dense" / "model.safetensors")
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    return folder


def sentence_transformers_vector(folder: Path, token_ids: list[int]) -> list[float]:
    """What sentence-transformers makes of one input to a folder built as above with mean
    pooling and the default Tanh, by hand: the base model's last states, mean pooled,
    through the Dense layer if any, unit length."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        vector = model.base_model(input_ids=torch.tensor([token_ids])).last_hidden_state[0].mean(dim=0)
    if (folder / "2_Dense").is_dir():
        dense = load_file(folder / "2_Dense" / "model.safetensors")
        vector = torch.tanh(dense["linear.weight"] @ vector + dense["linear.bias"])
    return torch.nn.functional.normalize(vector, dim=-1).tolist()


def sse_errors(lines: list[str]) -> list[dict]:
    """The error events among a stream's `data:` lines. Parsed, not searched for: a model's
    delta of exactly `error` reads `"content":"error"`, a random model's text among others."""
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
    return [event["error"] for event in events if "error" in event]


def streaming_versions_during(server, model: str, messages: list[dict], action, num_clients: int = 4, settle_s: float = 1.0):
    """Run `action()` while `num_clients` clients stream chat completions from `model` in a
    loop. Returns (what `action` returned, the version that served each stream, every error)."""
    versions, errors, stop = [], [], threading.Event()

    def keep_asking():
        client = server.client()
        while not stop.is_set():
            try:
                raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=24, stream=True)
                if list(raw.parse())[-1].choices[0].finish_reason not in ("stop", "length"):
                    raise AssertionError("a stream ended without a finish reason")
                versions.append(raw.headers["x-baton-version"])
            except Exception as error:  # any failure is what the caller looks for
                errors.append(error)

    clients = [threading.Thread(target=keep_asking) for _ in range(num_clients)]
    for thread in clients:
        thread.start()
    time.sleep(settle_s)
    result = action()
    time.sleep(settle_s)
    stop.set()
    for thread in clients:
        thread.join(timeout=120)
    return result, versions, errors


class ServerThread:
    """create_app(settings) under a real uvicorn server on a free port, in a thread."""

    def __init__(self, settings: Settings, engine_factory=None):
        app = create_app(settings) if engine_factory is None else create_app(settings, engine_factory)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._clients: list[openai.OpenAI] = []
        self.settings = settings

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + 600  # a vLLM engine takes minutes to start on CPU
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        for client in self._clients:  # an unclosed pool's sockets would warn whenever GC runs
            client.close()
        self._server.should_exit = True
        self._thread.join(timeout=60)

    @property
    def url(self) -> str:
        port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def client(self, **kwargs) -> openai.OpenAI:
        """An official openai client for this server, closed when the server stops."""
        kwargs.setdefault("api_key", self.settings.api_key or "unused")
        client = openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, timeout=120, **kwargs)
        self._clients.append(client)
        return client

    def anthropic_client(self, **kwargs) -> anthropic.Anthropic:
        """An official anthropic client for this server (its Messages API), closed when the server stops."""
        kwargs.setdefault("api_key", self.settings.api_key or "unused")
        client = anthropic.Anthropic(base_url=self.url, max_retries=0, timeout=120, **kwargs)
        self._clients.append(client)
        return client


@pytest.fixture(scope="session")
def tiny_server(tiny_model_path, tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("home"), models=[ModelSpec(name="tiny", path=tiny_model_path, engine="transformers")])
    with ServerThread(settings) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_client(tiny_server):
    return tiny_server.client()  # closed with the server


@pytest.fixture(scope="session")
def log_softmax_of(tiny_model_path):
    """The tiny model's log-probabilities at each position of a prompt, from the model run on
    that prompt alone: what scores reported by the server are checked against."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)

    def scores(prompt: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)

    return scores


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="session")
def smol_server(demo_version, tmp_path_factory):
    spec = ModelSpec(name="smollm2", path=demo_version.path, version=demo_version.ref, engine="transformers")
    settings = Settings(home=tmp_path_factory.mktemp("home"), models=[spec])
    with ServerThread(settings) as server:
        yield server
