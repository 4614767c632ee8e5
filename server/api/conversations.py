"""OpenAI's Conversations API: `/v1/conversations` and their items. A Responses request with
`conversation` reads the conversation's items before its input and, once it has ended well,
adds its input and output items there (responses.py); these routes make, read and edit the
list. Kept in SQLite beside the kept Responses (conversation_store.py), for the key that
made each one."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from server.api.openai_api import admit, owner_of
from server.api.responses import InputItem, as_kept_item, conversations_of, item_page
from server.api.schemas import Metadata, Strict

router = APIRouter(prefix="/v1", dependencies=[Depends(admit)])

MAX_ITEMS_AT_ONCE = 20  # items one request may add, as OpenAI has it


class ConversationRequest(Strict):
    items: list[InputItem] | None = Field(None, max_length=MAX_ITEMS_AT_ONCE)
    metadata: Metadata | None = None


class ConversationUpdate(Strict):
    metadata: Metadata


class ItemsRequest(Strict):
    items: list[InputItem] = Field(min_length=1, max_length=MAX_ITEMS_AT_ONCE)


@router.post("/conversations")
async def create_conversation(body: ConversationRequest, request: Request) -> dict:
    items = [as_kept_item(item) for item in body.items or []]
    return await asyncio.to_thread(conversations_of(request).create, owner_of(request), items, body.metadata or {})


@router.get("/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, request: Request) -> dict:
    return await asyncio.to_thread(conversations_of(request).get, owner_of(request), conversation_id)


@router.post("/conversations/{conversation_id}")
async def update_conversation(conversation_id: str, body: ConversationUpdate, request: Request) -> dict:
    return await asyncio.to_thread(conversations_of(request).update, owner_of(request), conversation_id, body.metadata)


@router.delete("/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request) -> dict:
    await asyncio.to_thread(conversations_of(request).delete, owner_of(request), conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.get("/conversations/{conversation_id}/items")
async def list_items(
    conversation_id: str, request: Request, limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc", after: str | None = None
) -> dict:
    """The conversation's items, OpenAI's cursor page (newest first by default)."""
    items = await asyncio.to_thread(conversations_of(request).items, owner_of(request), conversation_id)
    return item_page(items, limit, order, after)


@router.post("/conversations/{conversation_id}/items")
async def add_items(conversation_id: str, body: ItemsRequest, request: Request) -> dict:
    """The items, added after the conversation's others, as they are kept (with their ids)."""
    items = [as_kept_item(item) for item in body.items]
    await asyncio.to_thread(conversations_of(request).add, owner_of(request), conversation_id, items)
    return item_page(items, len(items), "asc", None)


@router.get("/conversations/{conversation_id}/items/{item_id}")
async def get_item(conversation_id: str, item_id: str, request: Request) -> dict:
    return await asyncio.to_thread(conversations_of(request).item, owner_of(request), conversation_id, item_id)


@router.delete("/conversations/{conversation_id}/items/{item_id}")
async def delete_item(conversation_id: str, item_id: str, request: Request) -> dict:
    """The conversation, without the item."""
    return await asyncio.to_thread(conversations_of(request).delete_item, owner_of(request), conversation_id, item_id)
