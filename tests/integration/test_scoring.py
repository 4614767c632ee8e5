"""`/score` and `/rerank` (vLLM's routes) on the transformers engine: each score is the
cosine of the two texts' vectors as /v1/embeddings gives them, whatever field names vLLM's
clients use; rerank orders by it; bad input is a 400 naming the field as it was sent.
(tests/vllm checks the same on vLLM's pooling runner.)"""

from __future__ import annotations

import httpx
import pytest
import torch

from server.api.scoring import pair_scores, ranked

QUERY = "The sea is deep"
DOCUMENTS = ["Deep water", "A dry desert in the sun", "The sea is deep", "Hi"]


def vectors(server, texts: list[str]) -> torch.Tensor:
    answer = httpx.post(f"{server.url}/v1/embeddings", json={"model": "tiny", "input": texts, "encoding_format": "float"}).json()
    return torch.tensor([item["embedding"] for item in answer["data"]])


def cosines(server, query: str, documents: list[str]) -> list[float]:
    found = vectors(server, [query, *documents])
    return torch.nn.functional.cosine_similarity(found[:1], found[1:], dim=-1).tolist()


def test_a_score_is_the_cosine_of_the_two_embeddings(tiny_server, tiny_tokenizer):
    answer = httpx.post(f"{tiny_server.url}/score", json={"model": "tiny", "queries": QUERY, "documents": DOCUMENTS})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [item["index"] for item in body["data"]] == [0, 1, 2, 3] and {item["object"] for item in body["data"]} == {"score"}
    assert [item["score"] for item in body["data"]] == pytest.approx(cosines(tiny_server, QUERY, DOCUMENTS), abs=1e-5)
    assert body["data"][2]["score"] == pytest.approx(1.0, abs=1e-5)  # the query itself
    num_tokens = sum(len(tiny_tokenizer.encode(text)) for text in [QUERY, *DOCUMENTS])
    assert body["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
    assert (body["model"], answer.headers["x-baton-deployment"]) == ("tiny", "tiny")


def test_queries_pair_with_documents_place_by_place_under_any_of_vllms_field_names(tiny_server):
    pairs = {"queries": ["Deep water", "Hi"], "documents": ["The sea", "Hello"]}
    expected = [cosines(tiny_server, query, [document])[0] for query, document in zip(pairs["queries"], pairs["documents"])]
    for first, second in (("queries", "documents"), ("queries", "items"), ("text_1", "text_2"), ("data_1", "data_2")):
        for path in ("/score", "/v1/score"):
            body = {"model": "tiny", first: pairs["queries"], second: pairs["documents"]}
            scores = [item["score"] for item in httpx.post(f"{tiny_server.url}{path}", json=body).json()["data"]]
            assert scores == pytest.approx(expected, abs=1e-5), (first, second, path)


def test_rerank_orders_documents_by_score_and_keeps_their_places(tiny_server):
    expected = cosines(tiny_server, QUERY, DOCUMENTS)
    order = sorted(range(len(DOCUMENTS)), key=lambda index: -expected[index])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        body = httpx.post(f"{tiny_server.url}{path}", json={"model": "tiny", "query": QUERY, "documents": DOCUMENTS}).json()
        assert [result["index"] for result in body["results"]] == order, path
        assert order[0] == 2 and body["results"][0]["relevance_score"] == pytest.approx(1.0, abs=1e-5)
        assert all(result["document"]["text"] == DOCUMENTS[result["index"]] for result in body["results"])
        assert body["id"].startswith("rerank-") and body["model"] == "tiny" and body["usage"]["prompt_tokens"] > 0
    top = httpx.post(f"{tiny_server.url}/rerank", json={"model": "tiny", "query": QUERY, "documents": DOCUMENTS, "top_n": 2, "return_documents": False}).json()
    assert [result["index"] for result in top["results"]] == order[:2]
    assert all("document" not in result for result in top["results"])


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/score", {"text_1": "a"}, "text_2"),
        ("/score", {"queries": "a", "documents": "b", "text_1": "c"}, "text_1"),
        ("/score", {}, "queries"),
        ("/score", {"queries": ["a", "b"], "documents": ["x", "y", "z"]}, "queries"),
        ("/score", {"text_1": "a", "text_2": []}, "text_2"),
        ("/score", {"queries": "a", "items": ["b", ""]}, "items"),
        ("/score", {"queries": "a", "documents": "word " * 5000}, "documents"),
        ("/score", {"queries": "a", "documents": "b", "truncate_prompt_tokens": 8}, "truncate_prompt_tokens"),
        ("/rerank", {"query": "", "documents": ["b"]}, "query"),
        ("/rerank", {"query": "a", "documents": []}, "documents"),
        ("/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n"),
        ("/rerank", {"query": "word " * 5000, "documents": ["b"]}, "query"),
    ],
)
def test_bad_input_is_a_400_naming_the_field_as_sent(tiny_server, path, body, param):
    refused = httpx.post(f"{tiny_server.url}{path}", json={"model": "tiny", **body})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == param, refused.text


def test_an_unknown_model_is_a_404(tiny_server):
    refused = httpx.post(f"{tiny_server.url}/rerank", json={"model": "nope", "query": "a", "documents": ["b"]})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"


def test_pair_scores_and_ranking_are_pure_rules():
    assert pair_scores([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]], 1) == pytest.approx([1.0, 0.0, -1.0])
    assert pair_scores([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], 2) == pytest.approx([0.0, 1.0])
    assert ranked([0.1, 0.5, 0.5, -1.0], 0) == [1, 2, 0, 3]  # a tie keeps the order sent
    assert ranked([0.1, 0.5, 0.5, -1.0], 2) == [1, 2]
    assert ranked([0.3], 5) == [0]
