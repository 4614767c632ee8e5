"""Counting tokens: `POST /tokenize` and `POST /detokenize`, vLLM's routes, answered with the
tokenizer and chat template of the version that serves the model now.

Rule: a swap may change the tokenizer behind a name, so a client budgeting its context counts
here, not with a copy of its own; the answer names the version it counted with (`model`, and
`x-baton-version`), and a request pinning a version (`chat@3`) counts with that one. A
request naming its `user` counts with the version that user's requests go to.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.api.generation import check_token_ids
from server.api.openai_api import admit, route_request, served_as, served_headers
from server.api.schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter(dependencies=[Depends(admit)])


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    """The ids a completion's prompt (or a chat completion's messages) would be read as:
    `count` is the `usage.prompt_tokens` that request would report."""
    lease = await request.state.router.lease_tokenizer(route_request(request, body.model, body.user))
    try:
        engine = lease.engine
        if body.messages is None:
            tokens = await asyncio.to_thread(engine.tokenize, body.prompt)  # off the loop, as for generation
        else:
            tokens = await asyncio.to_thread(engine.tokenize_chat, [m.as_template_input() for m in body.messages], body.template_tools, body.template_kwargs)
        answer = {"model": served_as(lease, body.model), "count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}
        return JSONResponse(answer, headers=served_headers(lease))
    finally:
        lease.release()


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    """The text of `tokens`, special tokens included (so that it tokenizes back the same)."""
    lease = await request.state.router.lease_tokenizer(route_request(request, body.model, body.user))
    try:
        engine = lease.engine
        check_token_ids(body.tokens, engine.vocab_size, "tokens")
        text = await asyncio.to_thread(engine.tokenizer.decode, body.tokens)
        return JSONResponse({"model": served_as(lease, body.model), "prompt": text}, headers=served_headers(lease))
    finally:
        lease.release()

