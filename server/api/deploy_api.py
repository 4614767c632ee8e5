"""Admin routes for deployments and swaps: /admin/deployments, /admin/swaps/{id}."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from server.api.admin_api import actor_change, require_admin
from server.deployments.health import HealthPolicy

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = ""


class DeployBody(_Body):
    name: str
    model: str = Field(description="a registry ref: chat, chat@2, chat@prod")
    on_demand: bool = Field(False, description="load on the first request, unload when idle")
    idle_ttl_s: float = Field(300.0, gt=0)
    smoke_prompts: list[str] | None = Field(None, min_length=1, description="each must produce a token before a flip")
    health: HealthPolicy = Field(default_factory=HealthPolicy, description="objectives, golden prompts, fallbacks, on_breach")


class SwapBody(_Body):
    to: str
    strategy: Literal["auto", "standby", "reload", "blue-green", "replace"] = Field("auto", description="auto: the fastest that is safe, and the record says why")
    wait: bool = Field(True, description="false: answer at once with the swap's id, and poll /admin/swaps/{id}")


class RollbackBody(_Body):
    wait: bool = True


class CanaryBody(_Body):
    to: str
    weight: int = Field(ge=1, le=99)


@router.get("/deployments")
async def list_deployments(request: Request) -> list[dict]:
    return [d.describe() for d in request.state.deployments.deployments]


@router.post("/deployments", status_code=201)
async def deploy(body: DeployBody, request: Request) -> dict:
    change = actor_change(request, body.reason)
    deployment = await request.state.deployments.deploy(body.name, body.model, change, body.on_demand, body.idle_ttl_s, body.smoke_prompts, body.health)
    return deployment.describe()


@router.get("/deployments/{name}")
async def show(name: str, request: Request) -> dict:
    return request.state.deployments.get(name).describe()


@router.post("/deployments/{name}/swap")
async def swap(name: str, body: SwapBody, request: Request) -> dict:
    record = await request.state.deployments.swap(name, body.to, body.strategy, actor_change(request, body.reason), wait=body.wait)
    return record.to_dict()


@router.post("/deployments/{name}/rollback")
async def rollback(name: str, request: Request, body: RollbackBody | None = None) -> dict:
    body = body or RollbackBody()
    return (await request.state.deployments.rollback(name, actor_change(request, body.reason), wait=body.wait)).to_dict()


@router.post("/deployments/{name}/canary")
async def canary(name: str, body: CanaryBody, request: Request) -> dict:
    return (await request.state.deployments.start_canary(name, body.to, body.weight, actor_change(request, body.reason))).to_dict()


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
    }


@router.get("/swaps/{swap_id}")
async def swap_status(swap_id: str, request: Request) -> dict:
    return request.state.deployments.record(swap_id).to_dict()
