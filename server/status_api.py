"""Health of the process and of every served model."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when every model can serve, else 503 with the reason per model."""
    models = {m.name: {"engine": m.engine.name, **asdict(m.engine.health())} for m in request.state.router.models}
    is_healthy = all(model["is_ready"] for model in models.values())
    body = {"status": "ok" if is_healthy else "unavailable", "models": models}
    return JSONResponse(body, status_code=200 if is_healthy else 503)
