"""The config file (`baton serve --config baton.yaml`): server settings and the desired
deployments, in YAML, validated by pydantic. An error names the field and its line, and a
bad file changes nothing. Secrets never sit in the file: keys come from the environment
(`api_key_env`, `admin_key_env`) or a key file whose keys name environment variables.

    server:            # any of Settings' fields, but keys and models
      port: 8000
      drain_timeout_s: 30
    api_key_env: BATON_API_KEY
    deployments:
      chat:
        model: chat@prod          # a registry ref or alias
        strategy: auto            # how a reload swaps it
        on_demand: false
        engine_options: {engine: vllm, max_model_len: 8192}
        canary: {weight: 10, analysis: {promote_after_s: 600, steps: [25, 50]}}  # a new version goes out as a canary
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from models.errors import ConfigError, InvalidRequestError
from models.names import NAME_PATTERN, Text
from server.config.settings import Settings
from server.deployments.health import CanaryAnalysis, CanaryStartWeight, HealthPolicy, MirrorShare, check_canary_share
from server.deployments.strategy import STRATEGIES
from server.api.tools import check_tool_parser
from server.engines.options import check_engine_options
from server.auth.keys import load_key_file

# Settings that the file may not hold (secrets, and what the file's own sections give).
NOT_IN_SERVER_SECTION = {"api_key", "admin_key", "keys", "models", "config_file"}


def check_options(options: dict) -> None:
    """Engine options known and well-typed, and a tool_parser baton or vLLM can read. Rule:
    every way options arrive (an import, a config file, the admin API, `baton serve`) checks
    them here."""
    check_engine_options(options)
    check_tool_parser(options.get("tool_parser"))


def _checked_engine_options(options: dict) -> dict:
    try:
        check_options(options)
    except InvalidRequestError as error:
        raise ValueError(error.message) from error
    return options


EngineOptions = Annotated[dict, AfterValidator(_checked_engine_options)]


class DeploymentSettings(BaseModel):
    """One deployment as an operator asks for it: in the config file, or `POST /admin/deployments`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="a registry ref or alias: chat, chat@2, chat@prod")
    on_demand: bool = Field(False, description="load on the first request, unload when idle")
    idle_ttl_s: float = Field(300.0, gt=0)
    smoke_prompts: list[Text] | None = Field(None, min_length=1, description="each must produce a token before a flip")
    health: HealthPolicy = Field(default_factory=HealthPolicy, description="objectives, golden prompts, fallbacks, on_breach")
    engine_options: EngineOptions = Field(default_factory=dict, description="over the version's own: engine, dtype, max_model_len...")


class CanaryRollout(BaseModel):
    """How a reload sends a new version out: as a canary at `weight` percent beside the
    version that serves (with copies of `mirror` percent of its requests), judged (and, with
    `promote_after_s`, promoted) by baton with `analysis`, or promoted by an operator; the
    fields of `POST .../canary`."""

    model_config = ConfigDict(extra="forbid")

    weight: CanaryStartWeight = 10
    mirror: MirrorShare = 0
    analysis: CanaryAnalysis | None = None

    @model_validator(mode="after")
    def _a_share_and_steps_that_go_up(self) -> CanaryRollout:
        try:
            check_canary_share(self.weight, self.mirror)
            if self.analysis is not None:
                self.analysis.check_steps_above(self.weight)
        except InvalidRequestError as error:
            raise ValueError(error.message) from error
        return self


class DeploymentConfig(DeploymentSettings):
    strategy: Literal[STRATEGIES] = "auto"  # type: ignore[valid-type]  # how a reload swaps it
    canary: CanaryRollout | None = Field(None, description="a new version goes out as a canary; `strategy` where none can run")


def _server_fields() -> dict:
    """Settings' fields that the file's `server` section and the environment may set: each
    optional (unset: Settings' default), with its bounds."""
    fields = {}
    for name, info in Settings.model_fields.items():
        if name not in NOT_IN_SERVER_SECTION:
            kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            fields[name] = (kind | None, Field(None, description=info.description))
    return fields


ServerSection = create_model("ServerSection", __config__=ConfigDict(extra="forbid"), **_server_fields())


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: ServerSection = Field(default_factory=ServerSection)
    api_key_env: str | None = None
    admin_key_env: str | None = None
    keys_file: Path | None = None
    deployments: dict[str, DeploymentConfig] = Field(default_factory=dict)

    @field_validator("server", mode="before")
    @classmethod
    def _no_secrets_or_models(cls, server):
        if isinstance(server, dict) and (forbidden := sorted(NOT_IN_SERVER_SECTION & set(server))):
            raise ValueError(f"{', '.join(forbidden)} cannot be set here: use api_key_env, admin_key_env, keys_file and deployments")
        return server

    @field_validator("deployments")
    @classmethod
    def _names_are_safe(cls, deployments: dict) -> dict:
        import re

        for name, settings in deployments.items():
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"deployment name {name!r} must match {NAME_PATTERN}")
            try:
                settings.health.check_for(name)
            except InvalidRequestError as error:
                raise ValueError(error.message) from error
        return deployments

    def server_settings(self) -> dict:
        """What the `server` section sets; a null value leaves Settings' default."""
        return self.server.model_dump(exclude_none=True)

    def restart_needed(self, running: Settings, overrides: dict) -> list[str]:
        """Server settings this file (with `overrides`, the BATON_* variables, over it) sets
        otherwise than the running server: a reload changes deployments only, so these take
        effect when `baton serve` starts again. Said, not dropped in silence."""
        wanted = {**self.server_settings(), **overrides}
        changed = [(name, getattr(running, name), value) for name, value in sorted(wanted.items()) if value != getattr(running, name)]
        return [f"! server.{name}: {now} -> {value} (at the next start; a reload changes deployments only)" for name, now, value in changed]

    def secrets(self, environ: dict[str, str] = os.environ) -> dict:
        """The keys the file points at, read from the environment now."""
        found = {}
        for field, setting in (("api_key_env", "api_key"), ("admin_key_env", "admin_key")):
            if (variable := getattr(self, field)) is not None:
                if not environ.get(variable):
                    raise ConfigError(f"{field} names {variable}, which is not set in the environment.")
                found[setting] = environ[variable]
        if self.keys_file is not None:
            found["keys"] = load_key_file(self.keys_file, environ)
        return found


def environment_overrides() -> dict:
    """Server settings from `BATON_<FIELD>` environment variables (BATON_PORT=9000,
    BATON_DRAIN_TIMEOUT_S=10; lists and maps as JSON), read by pydantic-settings; they win
    over the file's `server` section. Keys are not read this way: they have their own
    `*_env` fields. Each value is checked with its bounds, as in the file."""
    from pydantic_settings import BaseSettings, SettingsConfigDict

    base = type("EnvironmentBase", (BaseSettings,), {"model_config": SettingsConfigDict(env_prefix="BATON_", extra="ignore")})
    try:
        return create_model("EnvironmentSettings", __base__=base, **_server_fields())().model_dump(exclude_none=True)
    except ValidationError as error:
        first = error.errors()[0]
        raise ConfigError(f"BATON_{str(first['loc'][0]).upper()}: {first['msg']}.") from error


def load_config(path: Path) -> ConfigFile:
    """Read and validate `path`; ConfigError names the file, the line and the field."""
    try:
        text = Path(path).read_text()
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except OSError as error:
        raise ConfigError(f"Cannot read the config file {path}: {error.strerror}.") from error
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        raise ConfigError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML: {error.problem or error.context}.") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    data = {} if data is None else data  # an empty file: no settings, no deployments
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (server, deployments, ...).")
    try:
        return ConfigFile.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(path, text, error)) from error


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key written twice in one mapping is an error: the plain
    loader keeps the last one silently (a deployment pasted twice, one half lost)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the safe loader refuses it, with its own message
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is written twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _describe(path: Path, text: str, error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    line = _line_of(yaml.compose(text), first["loc"])
    return f"{path}:{line}: {where}: {first['msg']}" + (f" ({error.error_count() - 1} more)" if error.error_count() > 1 else "")


def _line_of(node, loc: tuple) -> int:
    """The 1-based line of the YAML node at `loc`, or of the nearest parent that exists."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            child = next((value for key, value in node.value if key.value == str(part)), None)
            key = next((key for key, value in node.value if key.value == str(part)), None)
            if child is None:
                return line
            line, node = key.start_mark.line + 1, child
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
