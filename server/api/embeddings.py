"""`POST /v1/embeddings`: OpenAI's embeddings, made by the version the model names now.

Rules: text is tokenized as vLLM embeds it (with the tokenizer's special tokens, an embedding
model's end-of-text token say); an input longer than the version's context is a 400, never
cut; a version served to generate only (vLLM's generate runner) answers a 400 that says how to
serve it for embeddings. A swap changes the vectors' space: the answer names the version
(`model`, `x-baton-version`), so a client can tell which index a vector belongs in.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from models.errors import ContextLengthExceededError, InvalidRequestError
from server.api.generation import check_token_ids
from server.api.openai_api import admit, observed_lease, route_request, served_as, served_headers, status_of
from server.api.schemas import EmbeddingRequest
from server.engines.base import can_embed
from server.engines.prompt import text_prompt_ids

router = APIRouter(prefix="/v1", dependencies=[Depends(admit)])


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    embedded = await embed(request, body.model, body.user, {"input": body.input}, body.priority)
    data = [{"object": "embedding", "index": index, "embedding": _encoded(vector, body.encoding_format)} for index, vector in enumerate(embedded.vectors)]
    answer = {"object": "list", "data": data, "model": embedded.model, "usage": usage(embedded.num_tokens)}
    return JSONResponse(answer, headers=embedded.headers)


@dataclass(frozen=True)
class Embedded:
    vectors: list[list[float]]  # the inputs' in order, field after field
    num_tokens: int
    model: str  # what answered, as the `model` field names it
    headers: dict


async def embed(request: Request, model: str, user: str | None, inputs: dict[str, list[str] | list[list[int]]], priority: int = 0) -> Embedded:
    """The vectors of each field's inputs (the field names errors' `param`), made in one call
    by the version that `model` names now, queued at `priority` where the key allows it."""
    route = route_request(request, model, user, priority)
    lease, observation = await observed_lease(request, route)
    try:
        await request.state.mirrors.copy(request, route, lease)
        engine = lease.engine
        if not can_embed(engine):
            raise InvalidRequestError(f"The model '{model}' is served by an engine that makes no embeddings (vLLM's generate runner); serve it with the engine option runner: pooling.", param="model", code="model_not_supported")
        prompts = await asyncio.to_thread(_input_ids, engine, inputs)  # off the loop, as for generation
        observation.num_prompt_tokens = num_tokens = sum(map(len, prompts))
        observation.prepared()
        vectors = await engine.embed(prompts)
    except BaseException as error:
        observation.finish(status_of(error))
        raise
    finally:
        lease.release()
    observation.finish(200)
    return Embedded(vectors, num_tokens, served_as(lease, model), served_headers(lease))


def usage(num_tokens: int) -> dict:
    return {"prompt_tokens": num_tokens, "total_tokens": num_tokens}


def _input_ids(engine, inputs: dict[str, list[str] | list[list[int]]]) -> list[list[int]]:
    prompts = []
    for param, values in inputs.items():
        for prompt in values:
            if isinstance(prompt, str):
                prompt = text_prompt_ids(engine.tokenizer, prompt, param, add_special_tokens=True)
            else:
                check_token_ids(prompt, engine.vocab_size, param)
            if len(prompt) > engine.max_model_len:
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {engine.max_model_len} tokens. However, an input of '{param}' has {len(prompt)} tokens. Please reduce its length.",
                    param=param,
                )
            prompts.append(prompt)
    return prompts


def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    """base64: the float32 values' little-endian bytes, as OpenAI sends them."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
