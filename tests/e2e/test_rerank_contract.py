"""Rerank over a real socket, at every path clients use.

``rerank_server`` runs the stand-in ruri-v3 reranker (ModernBERT, SentencePiece);
``fake_server`` runs the fake backend, whose logits tests compute themselves
(``fake_logit``: shared distinct characters minus 2).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.support.contract import RERANKER_MODEL, assert_error
from tests.support.fakes import fake_logit
from tests.support.live import LiveServer

PATHS = ["/v1/rerank", "/rerank", "/v2/rerank", "/v1/v1/rerank"]
V1_PATHS = ["/v1/rerank", "/rerank", "/v1/v1/rerank"]

QUERY = "日本の首都はどこですか"
DOCS = [
    "東京は日本の首都です。",
    "ラーメンは醤油、味噌、塩など多様なスープがあります。",
    "富士山は日本で最も高い山です。",
    "京都には歴史ある寺社が多く残っています。",
    "首都東京の人口は多いです。",
]


def rerank(server: LiveServer, body: dict[str, Any], path: str = "/v1/rerank") -> Any:
    with server.client() as client:
        reply = client.post(path, json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def expected_fake_order(query: str, docs: list[str]) -> list[int]:
    """Indices by fake score, highest first; ties keep document order."""
    return sorted(range(len(docs)), key=lambda i: -fake_logit(query, docs[i]))


# --- the reply ---------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_reply_has_every_field(rerank_server: LiveServer, path: str) -> None:
    reply = rerank(rerank_server, {"query": QUERY, "documents": DOCS}, path)
    assert {"id", "model", "results", "usage", "meta"} <= set(reply)
    assert isinstance(reply["id"], str) and reply["id"]
    assert reply["model"] == RERANKER_MODEL
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] > len(DOCS)
    assert reply["meta"]["billed_units"]["search_units"] == 1
    assert reply["meta"]["tokens"]["input_tokens"] == usage["total_tokens"]
    results = reply["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(0 < s < 1 for s in scores)


def test_ids_differ_between_requests(fake_server: LiveServer) -> None:
    body = {"query": QUERY, "documents": DOCS}
    assert rerank(fake_server, body)["id"] != rerank(fake_server, body)["id"]


@pytest.mark.parametrize("path", PATHS)
def test_scores_and_order_match_independent_expectation(fake_server: LiveServer, path: str) -> None:
    reply = rerank(fake_server, {"query": QUERY, "documents": DOCS}, path)
    order = expected_fake_order(QUERY, DOCS)
    assert [r["index"] for r in reply["results"]] == order
    for r in reply["results"]:
        assert r["relevance_score"] == pytest.approx(
            sigmoid(fake_logit(QUERY, DOCS[r["index"]])), rel=1e-6
        )


def test_documents_past_the_sigmoids_saturation_still_rank_by_logit(
    fake_server: LiveServer,
) -> None:
    """A sigmoid is 1.0 in float32 from a logit of 17 on: such documents had come back in
    document order. The fake logit is the count of shared characters, less 2."""
    query = "".join(chr(0x4E00 + i) for i in range(40))  # 40 distinct kanji
    documents = [query[:n] for n in (22, 35, 28, 3)]  # logits 20, 33, 26, 1
    reply = rerank(fake_server, {"query": query, "documents": documents})
    assert [r["index"] for r in reply["results"]] == [1, 2, 0, 3]
    assert [r["relevance_score"] for r in reply["results"]][:3] == [1.0, 1.0, 1.0]


def test_same_scores_on_every_path(rerank_server: LiveServer) -> None:
    replies = [rerank(rerank_server, {"query": QUERY, "documents": DOCS}, p) for p in PATHS]
    by_index = [{r["index"]: r["relevance_score"] for r in reply["results"]} for reply in replies]
    for other in by_index[1:]:
        for index, score in by_index[0].items():
            assert other[index] == pytest.approx(score, abs=1e-5)


# --- top_n -----------------------------------------------------------------------------


@pytest.mark.parametrize("top_n", ["absent", None, 0, len(DOCS), len(DOCS) + 1, 1000])
@pytest.mark.parametrize("path", PATHS)
def test_every_document_comes_back_unless_top_n_asks_for_fewer(
    fake_server: LiveServer, path: str, top_n: object
) -> None:
    body: dict[str, Any] = {"query": QUERY, "documents": DOCS}
    if top_n != "absent":
        body["top_n"] = top_n
    reply = rerank(fake_server, body, path)
    assert [r["index"] for r in reply["results"]] == expected_fake_order(QUERY, DOCS)


@pytest.mark.parametrize("top_n", [1, 2, len(DOCS) - 1])
def test_top_n_below_the_count_cuts_to_the_best(rerank_server: LiveServer, top_n: int) -> None:
    full = rerank(rerank_server, {"query": QUERY, "documents": DOCS})["results"]
    cut = rerank(rerank_server, {"query": QUERY, "documents": DOCS, "top_n": top_n})["results"]
    assert [r["index"] for r in cut] == [r["index"] for r in full[:top_n]]


@pytest.mark.parametrize("field", ["top_n", "top_k"])
def test_a_whole_number_with_a_fraction_is_an_integer(fake_server: LiveServer, field: str) -> None:
    """2.0 is an integer to JSON Schema, and the OpenAPI document says integer."""
    reply = rerank(fake_server, {"query": QUERY, "documents": DOCS, field: 2.0})
    results = reply["data"] if field == "top_k" else reply["results"]
    assert [r["index"] for r in results] == expected_fake_order(QUERY, DOCS)[:2]


@pytest.mark.parametrize("top_n", [-1, -100, "3", 1.5, True])
def test_bad_top_n_is_400(fake_server: LiveServer, top_n: object) -> None:
    with fake_server.client() as client:
        reply = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": top_n})
    assert_error(reply, 400, param="top_n", contains="top_n")


# --- max_tokens_per_doc (Cohere v2) ----------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_max_tokens_per_doc_scores_each_documents_first_tokens(
    fake_server: LiveServer, path: str
) -> None:
    """The fake tokenizer gives one token per character: each document is scored as its
    first three characters would be."""
    reply = rerank(fake_server, {"query": QUERY, "documents": DOCS, "max_tokens_per_doc": 3}, path)
    cut = [doc[:3] for doc in DOCS]
    assert len(set(cut)) == len(cut)
    assert expected_fake_order(QUERY, cut) != expected_fake_order(QUERY, DOCS)
    assert [r["index"] for r in reply["results"]] == expected_fake_order(QUERY, cut)
    for r in reply["results"]:
        assert r["relevance_score"] == pytest.approx(sigmoid(fake_logit(QUERY, cut[r["index"]])))


@pytest.mark.parametrize("tokens", [10**6, 2**70])
def test_max_tokens_per_doc_beyond_the_model_cuts_nothing(
    fake_server: LiveServer, tokens: int
) -> None:
    body = {"query": QUERY, "documents": DOCS, "max_tokens_per_doc": tokens}
    reply = rerank(fake_server, body, "/v2/rerank")
    assert [r["index"] for r in reply["results"]] == expected_fake_order(QUERY, DOCS)


@pytest.mark.parametrize("tokens", [0, -1, "3", 1.5, True])
def test_bad_max_tokens_per_doc_is_400(fake_server: LiveServer, tokens: object) -> None:
    body = {"query": QUERY, "documents": DOCS, "max_tokens_per_doc": tokens}
    with fake_server.client() as client:
        reply = client.post("/v2/rerank", json=body)
    assert_error(reply, 400, param="max_tokens_per_doc", contains="max_tokens_per_doc")


# --- return_documents and document objects --------------------------------------------


@pytest.mark.parametrize(
    ("path", "flag", "echoed"),
    [
        *[(p, "absent", True) for p in V1_PATHS],
        ("/v2/rerank", "absent", False),
        *[(p, True, True) for p in PATHS],
        *[(p, False, False) for p in PATHS],
        ("/v1/rerank", None, True),
        ("/v2/rerank", None, False),
    ],
)
def test_return_documents(fake_server: LiveServer, path: str, flag: object, echoed: bool) -> None:
    body: dict[str, Any] = {"query": QUERY, "documents": DOCS}
    if flag != "absent":
        body["return_documents"] = flag
    for r in rerank(fake_server, body, path)["results"]:
        if echoed:
            assert r["document"] == {"text": DOCS[r["index"]]}
        else:
            assert "document" not in r


def test_documents_as_objects_with_text(fake_server: LiveServer) -> None:
    docs = [{"text": d} for d in DOCS]
    reply = rerank(fake_server, {"query": QUERY, "documents": docs, "return_documents": True})
    assert [r["index"] for r in reply["results"]] == expected_fake_order(QUERY, DOCS)
    for r in reply["results"]:
        assert r["document"]["text"] == DOCS[r["index"]]


def test_object_documents_come_back_with_every_field_they_had(fake_server: LiveServer) -> None:
    """Cohere v1: "all other fields will be preserved in the response", nulls too."""
    docs = [{"text": "東京", "meta": None, "n": {"x": None}, "tags": []}, {"title": "t"}]
    body = {"query": QUERY, "documents": docs, "rank_fields": ["text", "title"]}
    reply = rerank(fake_server, body)
    assert [r["document"] for r in sorted(reply["results"], key=lambda r: r["index"])] == docs


def test_mixed_string_and_object_documents(rerank_server: LiveServer) -> None:
    plain = rerank(rerank_server, {"query": QUERY, "documents": DOCS})["results"]
    mixed_docs = [d if i % 2 else {"text": d} for i, d in enumerate(DOCS)]
    mixed = rerank(rerank_server, {"query": QUERY, "documents": mixed_docs})["results"]
    assert [r["index"] for r in mixed] == [r["index"] for r in plain]


def test_rank_fields_choose_what_is_ranked(fake_server: LiveServer) -> None:
    """``rank_fields`` ranks on the named fields; the whole object is echoed back."""
    docs = [
        {"title": "東京", "text": "zzz", "id": "a"},
        {"title": "xyz", "text": "yyy", "id": "b"},
    ]
    by_text = rerank(fake_server, {"query": "東京", "documents": docs})["results"]
    by_title = rerank(fake_server, {"query": "東京", "documents": docs, "rank_fields": ["title"]})[
        "results"
    ]
    assert by_text[0]["relevance_score"] == by_text[1]["relevance_score"]
    assert by_title[0]["index"] == 0
    assert by_title[0]["relevance_score"] > by_title[1]["relevance_score"]
    assert by_title[0]["document"]["id"] == "a"


def test_unknown_fields_are_accepted(fake_server: LiveServer) -> None:
    body = {
        "query": QUERY,
        "documents": DOCS,
        "max_chunks_per_doc": 10,
        "rank_fields": ["text"],
        "priority": 0,
        "user": "someone",
    }
    for path in PATHS:
        reply = rerank(fake_server, body, path)
        assert [r["index"] for r in reply["results"]] == expected_fake_order(QUERY, DOCS)


# --- raw scores ------------------------------------------------------------------------


def test_raw_scores_are_logits(rerank_server: LiveServer) -> None:
    normal = rerank(rerank_server, {"query": QUERY, "documents": DOCS})["results"]
    raw = rerank(rerank_server, {"query": QUERY, "documents": DOCS, "raw_scores": True})["results"]
    assert [r["index"] for r in raw] == [r["index"] for r in normal]
    scores = {r["index"]: r["relevance_score"] for r in normal}
    for r in raw:
        assert sigmoid(r["relevance_score"]) == pytest.approx(scores[r["index"]], abs=1e-6)


def test_raw_scores_exact_against_fake(fake_server: LiveServer) -> None:
    raw = rerank(fake_server, {"query": QUERY, "documents": DOCS, "raw_scores": True})["results"]
    for r in raw:
        assert r["relevance_score"] == fake_logit(QUERY, DOCS[r["index"]])


# --- model -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [RERANKER_MODEL, "ruri-v3-reranker-310m", None, ""])
def test_model_is_optional_or_a_served_name(rerank_server: LiveServer, name: str | None) -> None:
    reply = rerank(rerank_server, {"query": QUERY, "documents": DOCS, "model": name})
    assert reply["model"] in (RERANKER_MODEL, name)
    assert len(reply["results"]) == len(DOCS)


@pytest.mark.parametrize("path", PATHS)
def test_unknown_model_is_404(rerank_server: LiveServer, path: str) -> None:
    with rerank_server.client() as client:
        reply = client.post(
            path, json={"query": QUERY, "documents": DOCS, "model": "rerank-english-v3.0"}
        )
    assert_error(reply, 404, param="model", code="model_not_found", contains=RERANKER_MODEL)


# --- invalid requests ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": "", "documents": DOCS}, "query"),
        ({"query": "   ", "documents": DOCS}, "query"),
        ({"documents": DOCS}, "query"),
        ({"query": 1, "documents": DOCS}, "query"),
        ({"query": QUERY, "documents": []}, "documents"),
        ({"query": QUERY}, "documents"),
        ({"query": QUERY, "documents": "東京"}, "documents"),
        ({"query": QUERY, "documents": ["", "  \n"]}, "documents"),
        ({"query": QUERY, "documents": ["ok", 1]}, "documents"),
        ({"query": QUERY, "documents": ["ok", None]}, "documents"),
        ({"query": QUERY, "documents": [{"title": "no text"}]}, "documents"),
        ({"query": QUERY, "documents": [{"text": ""}]}, "documents"),
    ],
    ids=repr,
)
@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_invalid_requests_are_400_naming_the_field(
    fake_server: LiveServer, path: str, body: dict[str, Any], param: str
) -> None:
    with fake_server.client() as client:
        reply = client.post(path, json=body)
    assert_error(reply, 400, param=param, contains=param)


# A retrieval's results may hold a blank chunk (an image-only page, a whitespace-only
# split): Cohere ranks it with the rest, refusing only a list with no text at all. Here it
# had made the whole request a 400, and the client lost its reranking.
BLANKS = ["東京は日本の首都です。", "", "富士山", "  \n\u3000"]


def test_blank_documents_are_ranked_with_the_rest(rerank_server: LiveServer) -> None:
    import cohere

    v2 = cohere.ClientV2(base_url=rerank_server.base_url, api_key="x")
    ranked = v2.rerank(model=RERANKER_MODEL, query=QUERY, documents=BLANKS)
    assert sorted(r.index for r in ranked.results) == [0, 1, 2, 3]
    v1 = cohere.Client(base_url=rerank_server.base_url, api_key="x")
    echoed = v1.rerank(model=RERANKER_MODEL, query=QUERY, documents=BLANKS, return_documents=True)
    assert {r.index: r.document.text for r in echoed.results} == dict(enumerate(BLANKS))  # type: ignore[union-attr]
    with rerank_server.client() as client:
        # Open WebUI: top_n = len(documents), zipped by index.
        owui = client.post(
            "/v1/rerank",
            json={"model": RERANKER_MODEL, "query": QUERY, "documents": BLANKS, "top_n": 4},
        )
        tei = client.post("/rerank", json={"query": QUERY, "texts": BLANKS})
        ollama = client.post(
            "/api/rerank", json={"model": RERANKER_MODEL, "query": QUERY, "documents": BLANKS}
        )
        objects = client.post(
            "/v1/rerank", json={"query": QUERY, "documents": [{"text": t} for t in BLANKS]}
        )
    for reply in (owui, tei, ollama, objects):
        assert reply.status_code == 200, reply.text
    scores = {r["index"]: r["relevance_score"] for r in owui.json()["results"]}
    assert sorted(scores) == [0, 1, 2, 3]
    assert {r["index"]: r["score"] for r in tei.json()} == pytest.approx(scores)
    assert sorted(r["index"] for r in ollama.json()["results"]) == [0, 1, 2, 3]
    assert {r["index"]: r["relevance_score"] for r in objects.json()["results"]} == scores


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/api/rerank"])
def test_documents_with_no_text_at_all_are_400(fake_server: LiveServer, path: str) -> None:
    body = {"model": RERANKER_MODEL, "query": QUERY, "documents": ["", " ", "\n"]}
    with fake_server.client() as client:
        reply = client.post(path, json=body)
    assert reply.status_code == 400, reply.text
    assert "only empty texts" in reply.text


# --- token counts -----------------------------------------------------------------------


def test_token_counts_are_the_tokenizers_own(rerank_server: LiveServer) -> None:
    """usage counts every (query, document) pair as the cross-encoder saw it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(RERANKER_MODEL)
    pairs = [len(tokenizer(QUERY, doc)["input_ids"]) for doc in DOCS]
    assert all(n > len(tokenizer(QUERY)["input_ids"]) for n in pairs)
    reply = rerank(rerank_server, {"query": QUERY, "documents": DOCS, "top_n": 1})
    assert reply["usage"]["total_tokens"] == sum(pairs)
    assert reply["meta"]["tokens"]["input_tokens"] == sum(pairs)
