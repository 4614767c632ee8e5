"""The CLI's --server mode: ModelAdmin's methods, answered by a running server's admin API."""

from __future__ import annotations


import httpx

from models.catalog import Change
from models.registry import ImportOptions
from models.errors import BatonError


class RemoteError(BatonError):
    """An error the server answered with; its message is the server's."""


QUICK = httpx.Timeout(30.0, connect=5.0)  # every call but the ones that read whole models
LONG = httpx.Timeout(3600.0, connect=5.0)  # imports, verification, garbage collection
NUM_GET_ATTEMPTS = 3  # reads are idempotent: retried when the connection fails; changes never are


class AdminClient:
    def __init__(self, url: str, admin_key: str | None, actor: str):
        headers = {"x-baton-actor": actor}
        if admin_key:
            headers["authorization"] = f"Bearer {admin_key}"
        self._http = httpx.Client(base_url=url.rstrip("/") + "/admin", headers=headers, timeout=QUICK)

    def import_model(self, source: str, name: str, options: ImportOptions, change: Change) -> dict:
        body = {
            "source": source,
            "name": name,
            "allow_pickle": options.allow_pickle,
            "trust_remote_code": options.trust_remote_code,
            "engine_options": options.engine_options or {},
            "labels": options.labels or {},
            "notes": options.notes,
            "reason": change.reason,
            "base": options.base,
            "merge": options.merge,
            "move": options.move,
        }
        return self._call("POST", "/models", json=body, timeout=LONG)

    def list_models(self) -> list[dict]:
        return self._call("GET", "/models")

    def show(self, ref: str) -> dict:
        return self._call("GET", f"/models/{ref}")

    def alias(self, name: str, selector: str, alias: str, change: Change) -> dict:
        return self._call("POST", f"/models/{name}/aliases", json={"version": selector, "alias": alias, "reason": change.reason})

    def verify(self, ref: str, change: Change, show_progress: bool = False) -> dict:
        return self._call("POST", f"/models/{ref}/verify", json={"reason": change.reason}, timeout=LONG)

    def remove(self, ref: str, change: Change, force: bool = False) -> dict:
        return self._call("DELETE", f"/models/{ref}", params={"force": force, "reason": change.reason})

    def prune(self, name: str, keep: int, change: Change, dry_run: bool = False) -> dict:
        return self._call("POST", f"/models/{name}/prune", json={"keep": keep, "dry_run": dry_run, "reason": change.reason}, timeout=LONG)

    def collect_garbage(self) -> dict:
        return self._call("POST", "/models/gc", timeout=LONG)

    def history(self, name: str) -> list[dict]:
        return self._call("GET", f"/models/{name}/history")

    def deployments(self) -> list[dict]:
        return self._call("GET", "/deployments")

    def deployment(self, name: str) -> dict:
        return self._call("GET", f"/deployments/{name}")

    def deploy(self, name: str, ref: str, reason: str, on_demand: bool = False, idle_ttl_s: float = 300.0) -> dict:
        body = {"name": name, "model": ref, "reason": reason, "on_demand": on_demand, "idle_ttl_s": idle_ttl_s}
        return self._call("POST", "/deployments", json=body)

    def undeploy(self, name: str, reason: str) -> dict:
        return self._call("DELETE", f"/deployments/{name}", params={"reason": reason, "wait": False})

    def swap(self, name: str, to: str, strategy: str, reason: str, engine_options: dict | None = None) -> dict:
        body = {"to": to, "strategy": strategy, "reason": reason, "wait": False, "engine_options": engine_options}
        return self._call("POST", f"/deployments/{name}/swap", json=body)

    def preview_swap(self, name: str, to: str, strategy: str, engine_options: dict | None = None) -> dict:
        body = {"to": to, "strategy": strategy, "engine_options": engine_options, "dry_run": True}
        return self._call("POST", f"/deployments/{name}/swap", json=body)

    def rollback(self, name: str, reason: str) -> dict:
        return self._call("POST", f"/deployments/{name}/rollback", json={"reason": reason, "wait": False})

    def preview_rollback(self, name: str) -> dict:
        return self._call("POST", f"/deployments/{name}/rollback", json={"dry_run": True})

    def unload(self, name: str, reason: str) -> dict:
        return self._call("POST", f"/deployments/{name}/unload", json={"reason": reason, "wait": False})

    def canary(self, name: str, to: str, weight: int, reason: str, analysis: dict | None = None, mirror: int = 0) -> dict:
        return self._call("POST", f"/deployments/{name}/canary", json={"to": to, "weight": weight, "mirror": mirror, "reason": reason, "analysis": analysis})

    def step_canary(self, name: str, weight: int, reason: str) -> dict:
        return self._call("POST", f"/deployments/{name}/canary/step", json={"weight": weight, "reason": reason})

    def decide_canary(self, name: str, decision: str, reason: str) -> dict:
        return self._call("POST", f"/deployments/{name}/canary/{decision}", json={"reason": reason})

    def status(self) -> dict:
        return self._call("GET", "/status")

    def plan(self, deployments: dict, server: dict) -> dict:
        return self._call("POST", "/plan", json={"deployments": deployments, "server": server})

    def reload(self, reason: str) -> dict:
        return self._call("POST", "/reload", json={"reason": reason}, timeout=None)

    def swap_status(self, swap_id: str) -> dict:
        return self._call("GET", f"/swaps/{swap_id}")

    def _call(self, method: str, path: str, **kwargs):
        num_attempts = NUM_GET_ATTEMPTS if method == "GET" else 1
        for attempt in range(1, num_attempts + 1):
            try:
                response = self._http.request(method, path, **kwargs)
                break
            except httpx.TransportError as error:
                if attempt == num_attempts:
                    raise RemoteError(f"Cannot reach the baton server at {self._http.base_url}: {error}") from error
        if response.is_error:
            raise RemoteError(_error_message(response))
        return response.json()


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"
