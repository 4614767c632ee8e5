"""Admin routes for the registry under /admin/models.

Rules: with an admin key configured every admin route needs it; without one, only clients
on this machine (loopback) may call them. A local-folder import names a path on the server,
so it is refused unless the path lies under an operator-configured import root.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from models.catalog import Change
from models.importers import GGUF_PREFIX, HUB_PREFIX
from models.registry import ImportOptions
from server.auth.addresses import is_loopback
from server.auth.keys import authorize, bearer_token
from models.errors import ForbiddenError


async def require_admin(request: Request) -> None:
    """Async so that it runs on the event loop, not on a worker thread (see `openai_api.admit`)."""
    token = bearer_token(request.headers.get("authorization", ""))
    request.state.key = authorize(request.state.keys, "admin", token, is_loopback(request.client.host if request.client else ""))


router = APIRouter(prefix="/admin/models", dependencies=[Depends(require_admin)])


class ImportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, pattern=r"^[^\x00-\x1f]*$", description="a folder, hf:ORG/NAME@REVISION or gguf:FILE (no control characters)")
    name: str
    allow_pickle: bool = False
    trust_remote_code: bool = False
    engine_options: dict = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    notes: str = ""
    reason: str = ""
    base: str | None = Field(None, description="a LoRA adapter's base version (a registry ref): the adapter is merged into it")
    merge: bool = Field(True, description="false: the adapter is kept apart, beside the base's files, and vLLM serves it unmerged (multi-LoRA)")
    move: bool = Field(False, description="a model folder under an import root: its files leave it for the store once the version is committed (linked, not copied, where they can be)")


class AliasBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    alias: str
    reason: str = ""


class PruneBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep: int = Field(ge=1, description="the newest versions kept, held or not")
    dry_run: bool = Field(False, description="true: answer what would be deleted, and delete nothing")
    reason: str = ""


class ReasonBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = ""
    force: bool = False


@router.get("")
async def list_models(request: Request) -> list[dict]:
    return request.state.model_admin.list_models()


@router.post("")
async def import_model(body: ImportBody, request: Request) -> dict:
    _check_import_path(body.source, request.state.settings.import_roots)
    # A folder's files are read where its links lead; a GGUF file was resolved as a whole.
    is_folder = not body.source.startswith((HUB_PREFIX, GGUF_PREFIX))
    roots = tuple(request.state.settings.import_roots) if is_folder else ()
    options = ImportOptions(body.allow_pickle, body.trust_remote_code, body.engine_options, body.labels, body.notes, confine_to=roots, base=body.base, merge=body.merge, move=body.move)
    admin = request.state.model_admin
    return await asyncio.to_thread(admin.import_model, body.source, body.name, options, actor_change(request, body.reason))


@router.post("/gc")
async def collect_garbage(request: Request) -> dict:
    return await asyncio.to_thread(request.state.model_admin.collect_garbage)


@router.get("/{ref}")
async def show(ref: str, request: Request) -> dict:
    return request.state.model_admin.show(ref)


@router.get("/{name}/history")
async def history(name: str, request: Request) -> list[dict]:
    return request.state.model_admin.history(name)


@router.post("/{name}/aliases")
async def alias(name: str, body: AliasBody, request: Request) -> dict:
    return request.state.model_admin.alias(name, body.version, body.alias, actor_change(request, body.reason))


@router.post("/{name}/prune")
async def prune(name: str, body: PruneBody, request: Request) -> dict:
    change = actor_change(request, body.reason)
    return await asyncio.to_thread(request.state.model_admin.prune, name, body.keep, change, body.dry_run)


@router.post("/{ref}/verify")
async def verify(ref: str, request: Request, body: ReasonBody | None = None) -> dict:
    change = actor_change(request, body.reason if body else "")
    return await asyncio.to_thread(request.state.model_admin.verify, ref, change)


@router.delete("/{ref}")
async def remove(ref: str, request: Request, force: bool = False, reason: str = "") -> dict:
    return request.state.model_admin.remove(ref, actor_change(request, reason), force=force)


def actor_change(request: Request, reason: str) -> Change:
    """The caller may name the person behind a request; the record says it came over HTTP."""
    who = request.headers.get("x-baton-actor", "")[:64] or "anonymous"
    key = getattr(request.state, "key", None)
    return Change(f"{who} via admin-api" + (f" (key {key.name})" if key else ""), reason)


def _check_import_path(source: str, import_roots: list[Path]) -> None:
    if source.startswith(HUB_PREFIX):
        return
    path = Path(source.removeprefix(GGUF_PREFIX)).expanduser().resolve()
    if not any(path.is_relative_to(root.resolve()) for root in import_roots):
        raise ForbiddenError(
            f"Importing from a server path over HTTP needs the path under an import root (baton serve --import-root DIR); {path} is not.",
            param="source",
        )
