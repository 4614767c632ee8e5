"""Admin routes for deployments and swaps: /admin/deployments, /admin/swaps/{id}."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from contextlib import contextmanager
from dataclasses import asdict

from pydantic import ValidationError

from models.errors import ConfigError, ConflictError, InvalidRequestError
from server.api.admin_api import actor_change, require_admin
from server.config.file import ConfigFile, DeploymentSettings, EngineOptions, environment_overrides, load_config
from server.deployments.health import CanaryAnalysis, CanaryStartWeight, CanaryWeight, MirrorShare
from server.deployments.reconcile import drift

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = ""


class DeployBody(DeploymentSettings, _Body):
    name: str


class SwapBody(_Body):
    to: str
    strategy: Literal["auto", "standby", "reload", "blue-green", "replace"] = Field("auto", description="auto: the fastest that is safe, and the record says why")
    engine_options: EngineOptions | None = Field(None, description="the deployment's new engine options; with them, a swap to the version it serves restarts its engine")
    wait: bool = Field(True, description="false: answer at once with the swap's id, and poll /admin/swaps/{id}")
    dry_run: bool = Field(False, description="true: answer what the swap would do (strategy, why, whether requests wait, memory), refused as it would be, and do nothing")


class WaitBody(_Body):
    wait: bool = True


class RollbackBody(WaitBody):
    dry_run: bool = Field(False, description="true: answer what the rollback would do, and do nothing")


class CanaryBody(_Body):
    to: str
    weight: CanaryStartWeight
    mirror: MirrorShare = 0  # percent of the active version's requests copied to it, answers dropped (mirrors.py)
    analysis: CanaryAnalysis | None = None  # baton aborts (and may promote) it; None: an operator decides


class StepBody(_Body):
    weight: CanaryWeight


@router.get("/deployments")
async def list_deployments(request: Request) -> list[dict]:
    return [d.describe() for d in request.state.deployments.deployments]


@router.post("/deployments", status_code=201)
async def deploy(body: DeployBody, request: Request) -> dict:
    change = actor_change(request, body.reason)
    deployment = await request.state.deployments.deploy(
        body.name, body.model, change, body.on_demand, body.idle_ttl_s, body.smoke_prompts, body.health, body.engine_options
    )
    return deployment.describe()


@router.get("/deployments/{name}")
async def show(name: str, request: Request) -> dict:
    return request.state.deployments.get(name).describe()


@router.delete("/deployments/{name}")
async def remove(name: str, request: Request, reason: str = "", wait: bool = True) -> dict:
    """Stop serving `name` (its requests drain first) and forget it, restarts included."""
    return (await request.state.deployments.remove(name, actor_change(request, reason), wait=wait)).to_dict()


@router.post("/deployments/{name}/swap")
async def swap(name: str, body: SwapBody, request: Request) -> dict:
    if body.dry_run:
        return request.state.deployments.preview_swap(name, body.to, body.strategy, body.engine_options)
    change = actor_change(request, body.reason)
    record = await request.state.deployments.swap(name, body.to, body.strategy, change, wait=body.wait, engine_options=body.engine_options)
    return record.to_dict()


@router.post("/deployments/{name}/unload")
async def unload(name: str, request: Request, body: WaitBody | None = None) -> dict:
    """An on-demand deployment unloaded now (not at its idle TTL); its next request loads it."""
    body = body or WaitBody()
    return (await request.state.deployments.unload(name, actor_change(request, body.reason), wait=body.wait)).to_dict()


@router.post("/deployments/{name}/rollback")
async def rollback(name: str, request: Request, body: RollbackBody | None = None) -> dict:
    body = body or RollbackBody()
    if body.dry_run:
        return request.state.deployments.preview_rollback(name)
    return (await request.state.deployments.rollback(name, actor_change(request, body.reason), wait=body.wait)).to_dict()


@router.post("/deployments/{name}/canary")
async def canary(name: str, body: CanaryBody, request: Request) -> dict:
    return (await request.state.deployments.start_canary(name, body.to, body.weight, actor_change(request, body.reason), body.analysis, body.mirror)).to_dict()


@router.post("/deployments/{name}/canary/step")
async def step_canary(name: str, body: StepBody, request: Request) -> dict:
    """The canary's share moved by an operator (up or down); an analysis goes on from there."""
    return (await request.state.deployments.step_canary(name, actor_change(request, body.reason), body.weight)).to_dict()


@router.post("/deployments/{name}/canary/{decision}")
async def decide_canary(name: str, decision: Literal["promote", "abort"], request: Request, body: _Body | None = None) -> dict:
    manager, change = request.state.deployments, actor_change(request, body.reason if body else "")
    record = await (manager.promote_canary(name, change) if decision == "promote" else manager.abort_canary(name, change))
    return record.to_dict()


@router.get("/status")
async def status(request: Request) -> dict:
    """Which engine and version serve each deployment, and what is loaded."""
    manager = request.state.deployments
    return {
        "deployments": [d.describe() for d in manager.deployments],
        "memory_budget_bytes": request.state.settings.memory_budget_bytes,
        "memory_in_use_bytes": manager.memory_in_use_bytes,
        "gpus": request.state.gpus.status(),
        **_config_drift(request),
    }


def _config_drift(request: Request) -> dict:
    """With a config file: where what runs differs from it (an admin change since the last
    reload, say), undone by the next reload unless the file changes."""
    path = request.state.settings.config_file
    if path is None:
        return {}
    try:
        return {"config_file": str(path), "drift": drift(request.state.reconciler.plan(load_config(path)))}
    except ConfigError as error:
        return {"config_file": str(path), "drift": None, "config_error": str(error)}


@router.post("/reload")
async def reload(request: Request, body: _Body | None = None) -> dict:
    """Read the config file again and converge on it through swaps; a file that does not
    validate (or names an unknown version) is a 400 and changes nothing."""
    path = request.state.settings.config_file
    if path is None:
        raise ConflictError("This server was started without a config file (baton serve --config FILE).", code="no_config_file")
    change = actor_change(request, (body or _Body()).reason or "config reload")
    with _config_errors_as_bad_requests():
        config = load_config(path)
        changes = await request.state.reconciler.apply(config, change)
    return {"config_file": str(path), "changes": changes, "restart_needed": config.restart_needed(request.state.settings, environment_overrides())}


class PlanBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deployments: dict = Field(description="the config file's deployments section")
    server: dict = Field(default_factory=dict, description="its server section: settings that differ take effect at the next start")


@router.post("/plan")
async def plan(body: PlanBody, request: Request) -> dict:
    """What a config with these deployments would change here, changing nothing."""
    try:
        config = ConfigFile.model_validate({"deployments": body.deployments, "server": body.server})
    except ValidationError as error:
        raise InvalidRequestError(f"Invalid deployments: {error.errors()[0]['msg']} at {'.'.join(map(str, error.errors()[0]['loc']))}.", param="deployments") from error
    with _config_errors_as_bad_requests():
        changes = request.state.reconciler.plan(config)
    restart_needed = config.restart_needed(request.state.settings, environment_overrides())
    return {"changes": [asdict(change) | {"text": change.describe()} for change in changes], "restart_needed": restart_needed}


@contextmanager
def _config_errors_as_bad_requests():
    """The operator's file (or its unknown versions): a bad request, not a server fault."""
    try:
        yield
    except ConfigError as error:
        raise InvalidRequestError(str(error), code="invalid_config") from error


@router.get("/swaps/{swap_id}")
async def swap_status(swap_id: str, request: Request) -> dict:
    return request.state.deployments.record(swap_id).to_dict()
