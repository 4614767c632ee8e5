"""Targets: the one way from what an operator names (a registry version, a configured folder)
to the `Target` a slot loads. Option precedence, lowest first: the server's engine defaults,
the version's manifest, the deployment's overrides; pickle only where the import allowed it."""

from __future__ import annotations

from pathlib import Path

from models.errors import InvalidRequestError, NotFoundError
from models.registry import Registry
from server.config.settings import ModelSpec, Settings
from server.deployments.deployment import Deployment
from server.deployments.shared_engine import DEFAULT_MAX_LORAS, shared_engine_key
from server.deployments.slot import Target
from server.engines.factory import engine_for, estimate_memory_bytes
from server.engines.generation_config import SamplingDefaults
from server.engines.options import engine_only

# ModelSpec fields that, set explicitly, override every version's own engine options.
SPEC_ENGINE_FIELDS = ("engine", "dtype", "max_batch_size", "max_model_len")


class Targets:
    def __init__(self, settings: Settings, registry: Registry):
        self._settings = settings
        self._registry = registry

    def of_version(self, ref: str, overrides: dict | None = None) -> Target:
        """A registry version (refused if unknown, mid-import or corrupt), as it will load."""
        version = self._registry.resolve_for_serving(ref)
        options = {**self.engine_defaults, **version.manifest.engine_options, **(overrides or {}), "allow_pickle": version.manifest.allows_pickle}
        return target_of(version.ref, version.path, options, version.manifest.total_bytes, version.adapter, version.weights_digest, version.manifest.source.get("base"))

    def of_folder(self, spec: ModelSpec) -> Target:
        """A configured folder that is no registry version: its spec's settings are its options."""
        options = self.engine_defaults | {name: getattr(spec, name) for name in SPEC_ENGINE_FIELDS} | spec.engine_options | {"allow_pickle": spec.allow_pickle}
        stored_bytes = sum(p.stat().st_size for p in spec.path.rglob("*") if p.is_file())
        return target_of(spec.version, spec.path, options, stored_bytes)

    def for_swap(self, deployment: Deployment, ref: str, overrides: dict) -> Target:
        """Rule: a version deleted (forced) while it sits on standby can still come back, as
        the standby: its engine needs no files, and a deleted version's number is never
        given to other content."""
        try:
            return self.of_version(ref, overrides)
        except NotFoundError:
            standby = deployment.standby
            if standby is None or standby.version != ref:
                raise
            return standby.target

    def is_registry_version(self, spec: ModelSpec) -> bool:
        """The spec names a version of this server's registry, at the folder it stores (a
        label such as 'local', or a folder from elsewhere, is served as a folder)."""
        if spec.version == "local":
            return False
        try:
            return self._registry.resolve(spec.version).path == spec.path
        except (NotFoundError, InvalidRequestError):  # not a version here, or not a ref at all
            return False

    @property
    def engine_defaults(self) -> dict:
        """Rule: vLLM's sleep mode (its own allocator, slower first tokens under load) only
        where swapped-out versions may be kept asleep on standby."""
        return {} if self._settings.keep_standby else {"sleep_mode": False}


def spec_overrides(spec: ModelSpec) -> dict:
    """The engine settings a configured model sets explicitly, over its version's own."""
    return {name: getattr(spec, name) for name in SPEC_ENGINE_FIELDS if name in spec.model_fields_set} | spec.engine_options


def target_of(version: str, path: Path, options: dict, stored_bytes: int, adapter: Path | None = None, weights_digest: str | None = None, base: str | None = None) -> Target:
    """A version as it will load: its memory estimate and sampling defaults read from its
    folder; on vLLM with LoRA on (always, for an unmerged adapter), the key of the engine it
    shares with its base's other versions. Elsewhere an unmerged adapter is merged as it loads."""
    runs_on = engine_for(path, options.get("engine") or "auto")
    if runs_on == "vllm" and adapter is not None and not options.get("max_loras"):
        options = {**options, "max_loras": DEFAULT_MAX_LORAS}
    key = shared_engine_key(weights_digest or str(path), engine_only(options)) if runs_on == "vllm" and options.get("max_loras") else None
    memory_bytes = estimate_memory_bytes(path, options, stored_bytes)
    adapter_base = base if adapter is not None else None
    return Target(version, path, options, memory_bytes, stored_bytes, SamplingDefaults.read(path), adapter=adapter, adapter_base=adapter_base, shared_engine_key=key)
