"""`POST /score` and `POST /rerank` (vLLM's routes, also under /v1; /v2/rerank too, for
Cohere's and Jina's clients): how near texts are in meaning, as vLLM scores with an
embedding model (its bi-encoder scoring): the cosine of the two texts' embeddings.

Rules: the texts are embedded as /v1/embeddings embeds them, all in one call by the version
the model names now (the answer names it); a text too long for the context is a 400, never
cut; scores are in (-1, 1) and do not depend on which other texts came with them. Rerank
orders documents by score, highest first (ties keep the order sent), and `index` is each
document's place in the request.
"""

from __future__ import annotations

import time
import uuid

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.api.embeddings import embed, usage
from server.api.openai_api import admit
from server.api.schemas import RerankRequest, ScoreRequest

router = APIRouter(dependencies=[Depends(admit)])


@router.post("/score")
@router.post("/v1/score")
async def score(body: ScoreRequest, request: Request) -> JSONResponse:
    embedded = await embed(request, body.model, body.user, {"queries": body.queries, "documents": body.documents}, body.priority)
    scores = pair_scores(embedded.vectors, len(body.queries))
    answer = {
        "id": "score-" + uuid.uuid4().hex,
        "object": "list",
        "created": int(time.time()),
        "model": embedded.model,
        "data": [{"index": index, "object": "score", "score": value} for index, value in enumerate(scores)],
        "usage": usage(embedded.num_tokens),
    }
    return JSONResponse(answer, headers=embedded.headers)


@router.post("/rerank")
@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def rerank(body: RerankRequest, request: Request) -> JSONResponse:
    embedded = await embed(request, body.model, body.user, {"query": [body.query], "documents": body.documents}, body.priority)
    scores = pair_scores(embedded.vectors, 1)
    results = []
    for index in ranked(scores, body.top_n):
        document = {"document": {"text": body.documents[index]}} if body.return_documents else {}
        results.append({"index": index, **document, "relevance_score": scores[index]})
    answer = {"id": "rerank-" + uuid.uuid4().hex, "model": embedded.model, "usage": usage(embedded.num_tokens), "results": results}
    return JSONResponse(answer, headers=embedded.headers)


def pair_scores(vectors: list[list[float]], num_queries: int) -> list[float]:
    """The cosine of each query with the document at its place, or of the one query with
    every document: `vectors` holds the queries' vectors, then the documents'."""
    queries, documents = torch.tensor(vectors[:num_queries]), torch.tensor(vectors[num_queries:])
    return torch.nn.functional.cosine_similarity(queries.expand_as(documents), documents, dim=-1).tolist()


def ranked(scores: list[float], top_n: int) -> list[int]:
    """Indices of `scores`, highest first (a tie keeps the earlier index first); the first
    `top_n` of them, or all for 0."""
    order = sorted(range(len(scores)), key=lambda index: -scores[index])
    return order[:top_n] if top_n else order
