"""Health of the process and of every served model."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when every deployment can serve, else 503 with the reason per deployment."""
    models = {d.name: _deployment_health(d) for d in request.state.deployments.deployments}
    is_healthy = all(model["is_ready"] for model in models.values())
    body = {"status": "ok" if is_healthy else "unavailable", "models": models}
    return JSONResponse(body, status_code=200 if is_healthy else 503)


def _deployment_health(deployment) -> dict:
    """The active slot's engine health; a deployment in the middle of a `replace` swap is
    ready (its requests wait in the queue), so probes do not restart the process."""
    if deployment.active is None:
        return {"version": None, "is_ready": True, "num_running": 0, "num_waiting": deployment.num_waiting, "details": {}}
    engine = deployment.active.engine
    return {"version": deployment.version, "engine": engine.name, **asdict(engine.health())}
