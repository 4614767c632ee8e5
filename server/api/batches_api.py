"""OpenAI's Batch API: `/v1/batches` runs a file of requests to one endpoint in the
background, behind interactive traffic, and writes the answers to output files
(server/batches/runner.py carries it out)."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from models.errors import InvalidRequestError
from server.api.files_api import files_of
from server.api.openai_api import admit, owner_of
from server.api.responses import item_page
from server.api.schemas import Metadata, Strict
from server.batches.lines import ENDPOINTS
from server.batches.store import new_batch

router = APIRouter(prefix="/v1", dependencies=[Depends(admit)])


class BatchRequest(Strict):
    input_file_id: str = Field(max_length=128)
    endpoint: Literal[ENDPOINTS]
    completion_window: Literal["24h"]
    metadata: Metadata | None = None


@router.post("/batches")
async def create_batch(body: BatchRequest, request: Request) -> dict:
    owner = owner_of(request)
    input_file = await asyncio.to_thread(files_of(request).get, owner, body.input_file_id, "input_file_id")
    if input_file["purpose"] != "batch":
        raise InvalidRequestError(f"The file {body.input_file_id} is a batch's output, not an input (purpose 'batch').", param="input_file_id")
    batch = new_batch(body.endpoint, body.input_file_id, body.completion_window, body.metadata or {})
    await asyncio.to_thread(request.state.batches.add, owner, batch)
    request.state.batch_runner.start(owner, batch)
    return batch


@router.get("/batches")
async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None) -> dict:
    """Newest first."""
    newest_first = await asyncio.to_thread(request.state.batches.list, owner_of(request))
    return item_page(newest_first[::-1], limit, "desc", after)


@router.get("/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request) -> dict:
    return await asyncio.to_thread(request.state.batches.get, owner_of(request), batch_id)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> dict:
    """A running batch stops taking up its requests (`cancelling`, then `cancelled` with what
    was answered); one that ended is returned as it ended."""
    return await request.state.batch_runner.cancel(owner_of(request), batch_id)
