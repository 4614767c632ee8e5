"""Settings: one validated pydantic model, built once in `main` and passed down."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.names import NAME_PATTERN, Text
from server.observability.devices import gpu_memory_bytes
from server.deployments.health import HealthPolicy
from server.engines.base import Dtype
from server.auth.keys import KeySpec, key


def default_memory_budget() -> int:
    """Models run on the GPUs where there are some: all their memory; else 70% of RAM."""
    return sum(gpu_memory_bytes()) or int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.7)


def half_of_ram() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)


def default_home() -> Path:
    return Path(platformdirs.user_data_dir("baton", appauthor=False))


class ModelSpec(BaseModel):
    """A model served under a name, loaded from a local Hugging Face folder."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The name clients send in the `model` field.")
    path: Path
    version: str = Field("local", description="What served it, for the x-baton-version header: a registry ref or 'local'.")
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    dtype: Dtype = "auto"
    max_batch_size: int = Field(16, ge=1, le=256)
    max_model_len: int | None = Field(None, ge=16)
    allow_pickle: bool = False
    on_demand: bool = Field(False, description="Load on the first request; unload after idle_ttl_s with nothing in flight.")
    idle_ttl_s: float = Field(300.0, gt=0)
    smoke_prompts: list[Text] | None = Field(None, min_length=1, description="Checked before a swap flips; default: the server's.")
    health: HealthPolicy = Field(default_factory=HealthPolicy, description="Objectives, golden prompts, fallbacks, and what to do on a breach.")
    engine_options: dict = Field(default_factory=dict, description="Engine options over every version's own (a config file's deployment sets them).")
    rolls_out: bool = Field(False, description="A config file's deployment with a canary rollout: a restart resumes the rollout instead of skipping it.")

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, name: str) -> str:
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError(f"model name {name!r} must match {NAME_PATTERN} (lowercase, digits, . _ -)")
        return name


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    home: Path = Field(default_factory=default_home, description="Where baton keeps models and state.")
    models: list[ModelSpec] = Field(default_factory=list)
    api_key: str | None = Field(None, description="When set, /v1 routes need 'Authorization: Bearer <key>' (an inference key).")
    admin_key: str | None = Field(None, description="When set, /admin routes need it (an admin key); with no admin key, they answer loopback clients only.")
    request_metrics: bool = Field(True, description="Per-request metrics, log lines and health outcomes; off only to measure their cost.")
    metrics_need_key: bool = Field(False, description="/metrics needs a key with the metrics scope; off: open, as Prometheus scrapes expect.")
    keys: list[KeySpec] = Field(default_factory=list, description="More keys, hashed, each with its scopes and deployments (see server/auth/keys.py).")
    import_roots: list[Path] = Field(default_factory=list, description="Server folders that admin-API imports may read.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="The largest file POST /v1/files takes (a batch's input), as OpenAI's Batch API has it.")
    max_file_bytes_per_key: int | None = Field(10 * 1024**3, ge=1024, description="What one key's files (batch inputs and outputs) may take on disk; an upload past it is a 400. None: no limit.")
    max_n: int = Field(8, ge=1, description="The largest `n` (choices per request) accepted.")
    max_prompt_tokens: int | None = Field(None, ge=1, description="The longest prompt accepted, in tokens; None: the model's context.")
    max_completion_tokens: int | None = Field(None, ge=1, description="The most tokens one choice may generate; also the default when a request sets none.")
    max_running_per_deployment: int | None = Field(None, ge=1, description="Requests one deployment runs at once; more wait in its queue (max_waiting). None: no cap.")
    drain_timeout_s: float = Field(30.0, gt=0, description="How long a swapped-out version may finish its requests.")
    max_waiting: int = Field(64, ge=0, description="Requests held per deployment while a `replace` swap runs.")
    max_wait_s: float = Field(120.0, gt=0, description="How long a held request waits before a 503.")
    verify_timeout_s: float = Field(120.0, gt=0, description="Deadline for the smoke prompts of a new version.")
    smoke_prompts: list[Text] = Field(default_factory=lambda: ["Hello"], min_length=1)
    keep_standby: bool = Field(True, description="Keep a swapped-out version loaded for instant rollback, if the budget allows.")
    memory_budget_bytes: int = Field(default_factory=lambda: default_memory_budget(), gt=0)
    standby_host_budget_bytes: int = Field(default_factory=half_of_ram, ge=0, description="Host memory that versions asleep on standby may hold (their weights); default half of RAM.")
    gpu_headroom_gib: float = Field(2.0, ge=0, description="GPU memory the plan leaves free when it sizes a vLLM engine.")
    gpu_room_for_blue_green: bool = Field(False, description="Size each vLLM engine so that a second one fits beside it (blue-green swaps on one GPU).")
    gpu_sample_interval_s: float = Field(5.0, gt=0, description="How often NVML is read (on its own thread).")
    idle_check_s: float = Field(1.0, gt=0, description="How often on-demand deployments are checked for idleness.")
    store_responses: bool = Field(True, description="Keep each Responses API answer (unless its request says store: false, as OpenAI has it) for previous_response_id and GET /v1/responses/{id}, serve conversations (/v1/conversations), and keep chat completions asked to be stored (store: true).")
    responses_ttl_s: float = Field(30 * 24 * 3600.0, gt=0, description="How long a kept Response can be read or continued (default 30 days, OpenAI's).")
    max_kept_bytes_per_key: int | None = Field(
        1024**3, ge=1024, description="What one key's kept Responses, stored chat completions and conversations may take together; past it the oldest Responses and completions go first. None: no limit."
    )
    restore_state: bool = Field(True, description="On start, bring back the deployments and versions the last run saved (with a config file, which is the truth, only its canary rollouts under way).")
    config_file: Path | None = Field(None, description="The YAML file these settings came from; reloads read it again.")
    watch_config_s: float | None = Field(None, gt=0, description="With a config file: look at it this often and reload when it changes (a mounted ConfigMap).")

    @model_validator(mode="after")
    def _keys_are_distinct(self):
        """Each key has its own name (logs, history and rate limits go by it) and its own
        secret (a request must match one key, with one set of scopes)."""
        names, by_secret = set(), {}
        for spec in self.all_keys():
            if spec.name in names:
                raise ValueError(f"two keys are named {spec.name!r}; each key needs its own name")
            if (earlier := by_secret.get(spec.sha256)) is not None:
                raise ValueError(f"the keys {earlier!r} and {spec.name!r} have the same secret; give one key both scopes in a key file instead")
            names.add(spec.name)
            by_secret[spec.sha256] = spec.name
        return self

    def all_keys(self) -> list[KeySpec]:
        """`keys`, with `api_key` and `admin_key` as keys of one scope each."""
        single = [key("api-key", self.api_key, {"inference"})] if self.api_key else []
        single += [key("admin-key", self.admin_key, {"admin"})] if self.admin_key else []
        return single + self.keys
