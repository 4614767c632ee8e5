"""API keys and their scopes: who may call what.

Rules:
- A key is kept only as its sha256; the secret itself comes from the environment
  (`key_env`) or is given hashed (`key_sha256`), never written in a file, never logged.
- Scopes: `inference` (`/v1/*`), `admin` (`/admin/*`), `metrics` (`/metrics`, when the
  operator closes it); a key may be limited to some deployments. `/health` and `/ready` are
  always open.
- Where no key has a scope, that scope is open as before keys: `/v1` to anyone who can
  reach the port (`baton serve` refuses a non-loopback bind then, unless `--no-auth`),
  `/admin` to loopback clients only.
- A request's key is compared against every key in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.errors import AuthenticationError, ConfigError, ForbiddenError

Scope = Literal["inference", "admin", "metrics"]


class KeySpec(BaseModel):
    """One key: its name (for logs and history: never the secret), its hash, its rights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: frozenset[Scope] = Field(min_length=1)
    deployments: frozenset[str] | None = Field(None, description="None: every deployment")
    requests_per_minute: int | None = Field(None, ge=1, description="None: no rate limit")
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt and completion tokens; None: no limit")
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1, description="the soonest its requests are served (lower is sooner); a request may ask only to wait longer")

    def may_call(self, deployment: str) -> bool:
        return self.deployments is None or deployment in self.deployments


def priority_of(key: KeySpec | None, asked: int) -> int:
    """Rule: a request's priority (lower is sooner) is its own, but never sooner than its
    key's (0 without a key), so that no client jumps a queue the operator did not give it."""
    return max(asked, key.priority if key is not None else 0)


class _KeyFileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    key_env: str | None = Field(None, description="the environment variable that holds the secret")
    key_sha256: str | None = None
    scopes: list[Scope] = Field(min_length=1)
    deployments: list[str] | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    priority: int = 0

    @model_validator(mode="after")
    def _one_secret_source(self):
        if (self.key_env is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key_env (an environment variable) or key_sha256")
        return self


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key(name: str, secret: str, scopes: set[str], deployments: set[str] | None = None, **limits: int | None) -> KeySpec:
    """A key from its secret; `limits`: requests_per_minute, tokens_per_minute, priority."""
    deployments = frozenset(deployments) if deployments is not None else None
    return KeySpec(name=name, sha256=hash_key(secret), scopes=frozenset(scopes), deployments=deployments, **limits)


def load_key_file(path: Path, environ: dict[str, str] = os.environ) -> list[KeySpec]:
    """A JSON list of {name, key_env | key_sha256, scopes, deployments?}. Errors name the entry."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"Cannot read the key file {path}: {error}") from error
    if not isinstance(entries, list):
        raise ConfigError(f"The key file {path} must hold a JSON list of keys.")
    return [_key_of(index, entry, environ, path) for index, entry in enumerate(entries)]


def _key_of(index: int, entry, environ: dict[str, str], path: Path) -> KeySpec:
    try:
        spec = _KeyFileEntry.model_validate(entry)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "entry"
        raise ConfigError(f"{path}, key {index}: {where}: {first['msg']}.") from error
    if spec.key_env is not None and not environ.get(spec.key_env):
        raise ConfigError(f"{path}, key {index} ({spec.name}): the environment variable {spec.key_env} is not set.")
    sha256 = spec.key_sha256.lower() if spec.key_sha256 else hash_key(environ[spec.key_env])
    deployments = frozenset(spec.deployments) if spec.deployments is not None else None
    try:
        return KeySpec(name=spec.name, sha256=sha256, scopes=frozenset(spec.scopes), deployments=deployments, requests_per_minute=spec.requests_per_minute, tokens_per_minute=spec.tokens_per_minute, priority=spec.priority)
    except ValidationError as error:
        raise ConfigError(f"{path}, key {index} ({spec.name}): {error.errors()[0]['msg']}.") from error


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def match_key(keys: list[KeySpec], token: str | None) -> KeySpec | None:
    """The key whose hash is the token's; every key is compared, whatever matches first."""
    if not token:
        return None
    given, found = hash_key(token), None
    for spec in keys:
        if hmac.compare_digest(spec.sha256, given):
            found = spec
    return found


def is_open(keys: list[KeySpec], scope: Scope) -> bool:
    """Rule: a scope no key has is open, to every client (admin: to loopback ones)."""
    return not any(scope in spec.scopes for spec in keys)


def authorize(keys: list[KeySpec], scope: Scope, token: str | None, is_local: bool) -> KeySpec | None:
    """The key that may use `scope`, or None where the scope is open; raises 401 or 403."""
    if is_open(keys, scope):
        if scope == "admin" and not is_local:
            raise ForbiddenError("Admin routes are open to loopback clients only; configure an admin key to allow others.")
        return None
    spec = match_key(keys, token)
    if spec is None:
        raise AuthenticationError(f"Missing or invalid API key. Send 'Authorization: Bearer <key>' with a key that has the {scope} scope.")
    if scope not in spec.scopes:
        raise ForbiddenError(f"The key {spec.name!r} does not have the {scope} scope.", code="insufficient_scope")
    return spec

