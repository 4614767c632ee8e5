"""Probes and scrapes: /health (every model's engine), /ready (readiness), /metrics."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.auth.keys import KeySpec, authorize, bearer_token

router = APIRouter()
# With metrics_need_key and no key having the scope, nobody's key matches: every scrape is a 401.
_NOBODY = KeySpec(name="nobody", sha256="0" * 64, scopes=frozenset({"metrics"}))


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when every deployment can serve, else 503 with the reason per deployment."""
    models = {d.name: _deployment_health(d) for d in request.state.deployments.deployments}
    is_healthy = all(model["is_ready"] for model in models.values())
    body = {"status": "ok" if is_healthy else "unavailable", "models": models}
    return JSONResponse(body, status_code=200 if is_healthy else 503)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 503 while shutting down or when a deployment has nothing that can serve;
    200 during a swap that keeps serving (held requests are served when it ends)."""
    not_ready = {d.name: d.describe()["state"] for d in request.state.deployments.deployments if not _can_serve(d)}
    if request.state.lifecycle.is_shutting_down:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    if not_ready:
        return JSONResponse({"status": "unavailable", "deployments": not_ready}, status_code=503)
    return JSONResponse({"status": "ready"})


def _can_serve(deployment) -> bool:
    """Loaded and healthy, loadable on demand, or swapping (requests are held, not failed)."""
    if deployment.active is None:
        return deployment.needs_load or deployment.swap_lock.locked()
    return deployment.active.engine.health().is_ready


def _deployment_health(deployment) -> dict:
    """The active slot's engine health; a deployment in the middle of a `replace` swap is
    ready (its requests wait in the queue), so probes do not restart the process."""
    if deployment.active is None:
        return {"version": None, "is_ready": True, "num_running": 0, "num_waiting": deployment.num_waiting, "details": {}}
    engine = deployment.active.engine
    return {"version": deployment.version, "engine": engine.name, **asdict(engine.health())}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format: open, unless the operator made it need a key with the
    `metrics` scope (`metrics_need_key`)."""
    if request.state.settings.metrics_need_key:
        token = bearer_token(request.headers.get("authorization", ""))
        authorize([k for k in request.state.keys if "metrics" in k.scopes] or [_NOBODY], "metrics", token, is_local=False)
    return Response(request.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
