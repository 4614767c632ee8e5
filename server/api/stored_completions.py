"""OpenAI's stored chat completions: those made with `store: true` (openai_api.py keeps
them, completion_store.py holds them), listed, read, their messages read, their metadata
changed, and deleted, each by the key that made it."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request

from server.api.completion_store import CompletionStore
from server.api.openai_api import admit, kept_in, owner_of
from server.api.responses import item_page
from server.api.schemas import Metadata, Strict

router = APIRouter(prefix="/v1", dependencies=[Depends(admit)])


class CompletionUpdate(Strict):
    metadata: Metadata


@router.get("/chat/completions")
async def list_completions(
    request: Request,
    model: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "asc",
    after: str | None = None,
) -> dict:
    """Oldest first by default; `metadata[key]=value` (as OpenAI's SDK sends a filter): only
    completions whose metadata has each such pair."""
    completions = await asyncio.to_thread(_store(request).list, owner_of(request), model, _metadata_filter(request))
    return item_page(completions, limit, order, after)


@router.get("/chat/completions/{completion_id}")
async def get_completion(completion_id: str, request: Request) -> dict:
    return await asyncio.to_thread(_store(request).get, owner_of(request), completion_id)


@router.post("/chat/completions/{completion_id}")
async def update_completion(completion_id: str, body: CompletionUpdate, request: Request) -> dict:
    return await asyncio.to_thread(_store(request).update, owner_of(request), completion_id, body.metadata)


@router.delete("/chat/completions/{completion_id}")
async def delete_completion(completion_id: str, request: Request) -> dict:
    await asyncio.to_thread(_store(request).delete, owner_of(request), completion_id)
    return {"id": completion_id, "object": "chat.completion.deleted", "deleted": True}


@router.get("/chat/completions/{completion_id}/messages")
async def list_messages(
    completion_id: str, request: Request, limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "asc", after: str | None = None
) -> dict:
    messages = await asyncio.to_thread(_store(request).messages, owner_of(request), completion_id)
    return item_page(messages, limit, order, after)


def _store(request: Request) -> CompletionStore:
    return kept_in(request.state.completions, "chat completions", "completion_not_found")


def _metadata_filter(request: Request) -> dict[str, str]:
    return {name[len("metadata[") : -1]: value for name, value in request.query_params.items() if name.startswith("metadata[") and name.endswith("]")}
