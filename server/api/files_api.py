"""OpenAI's Files API, for batches: `/v1/files` uploads a batch's input (purpose `batch`),
and lists, reads and deletes it and the output files batches write (server/batches/)."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from models.errors import InvalidRequestError
from server.api.openai_api import admit, owner_of
from server.api.responses import item_page
from server.batches.files import PURPOSES, FileStore

router = APIRouter(prefix="/v1", dependencies=[Depends(admit)])
MAX_FILENAME = 255


@router.post("/files")
async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...)) -> dict:
    """Rule: the name a client gives is a label, never a path."""
    if purpose != "batch":
        raise InvalidRequestError("baton keeps files for batches: purpose must be 'batch'.", param="purpose")
    filename = (file.filename or "input.jsonl")[-MAX_FILENAME:]
    return await asyncio.to_thread(files_of(request).add, owner_of(request), filename, purpose, file.file)


@router.get("/files")
async def list_files(
    request: Request, purpose: Literal[PURPOSES] | None = None, limit: int = Query(10000, ge=1, le=10000), order: Literal["asc", "desc"] = "desc", after: str | None = None
) -> dict:
    newest_first = await asyncio.to_thread(files_of(request).list, owner_of(request), purpose)
    return item_page(newest_first[::-1], limit, order, after)


@router.get("/files/{file_id}")
async def get_file(file_id: str, request: Request) -> dict:
    return await asyncio.to_thread(files_of(request).get, owner_of(request), file_id)


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> FileResponse:
    return FileResponse(await asyncio.to_thread(files_of(request).path, owner_of(request), file_id), media_type="application/jsonl")


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict:
    await asyncio.to_thread(files_of(request).delete, owner_of(request), file_id)
    return {"id": file_id, "object": "file", "deleted": True}


def files_of(request: Request) -> FileStore:
    return request.state.files
