"""POST /v1/embeddings over a real socket: every field, every input shape, every error.

``embeddings_server`` runs the real app over the stand-in ruri-large (MeCab
tokenizer, dimension 64); ``fake_server`` runs the fake backend, whose vectors
tests can compute independently (``fake_text_vector``).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from tests.support.contract import EMBEDDINGS_MODEL, STANDIN_DIM, assert_error
from tests.support.fakes import fake_text_vector
from tests.support.live import LiveServer
from tests.support.standins import japanese_text

JA = "東京は日本の首都です。"


def embed(server: LiveServer, body: dict[str, Any], path: str = "/v1/embeddings") -> Any:
    with server.client() as client:
        reply = client.post(path, json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def vectors(reply: dict[str, Any]) -> np.ndarray:
    return np.asarray([item["embedding"] for item in reply["data"]], dtype=np.float32)


def decode(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


# --- the reply -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embeddings"])
def test_reply_has_every_field(embeddings_server: LiveServer, path: str) -> None:
    reply = embed(embeddings_server, {"input": [JA, "瑠璃色"], "model": EMBEDDINGS_MODEL}, path)
    assert set(reply) == {"object", "data", "model", "usage"}
    assert reply["object"] == "list"
    assert reply["model"] == EMBEDDINGS_MODEL
    assert [item["object"] for item in reply["data"]] == ["embedding", "embedding"]
    assert [item["index"] for item in reply["data"]] == [0, 1]
    for item in reply["data"]:
        assert set(item) == {"object", "index", "embedding"}
        assert len(item["embedding"]) == STANDIN_DIM
        assert all(isinstance(x, float) for x in item["embedding"])
        assert np.isfinite(item["embedding"]).all() and np.abs(item["embedding"]).max() > 0
    usage = reply["usage"]
    assert set(usage) == {"prompt_tokens", "total_tokens"}
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0


def test_string_input_is_one_item_equal_to_the_list_form(embeddings_server: LiveServer) -> None:
    single = embed(embeddings_server, {"input": JA})
    listed = embed(embeddings_server, {"input": [JA]})
    assert len(single["data"]) == 1 and single["data"][0]["index"] == 0
    np.testing.assert_allclose(vectors(single), vectors(listed), atol=1e-6)
    assert single["usage"] == listed["usage"]


def test_model_is_optional_and_defaults_to_the_served_model(embeddings_server: LiveServer) -> None:
    assert embed(embeddings_server, {"input": "a"})["model"] == EMBEDDINGS_MODEL


def test_order_is_preserved_for_many_inputs(embeddings_server: LiveServer) -> None:
    texts = [f"{i}番目の文章: {japanese_text(5 + i % 40, seed=i)}" for i in range(100)]
    forward = embed(embeddings_server, {"input": texts})
    backward = embed(embeddings_server, {"input": texts[::-1]})
    assert [d["index"] for d in forward["data"]] == list(range(100))
    assert [d["index"] for d in backward["data"]] == list(range(100))
    np.testing.assert_allclose(vectors(forward), vectors(backward)[::-1], atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in vectors(forward)}) == 100


def test_order_matches_independent_expectation(fake_server: LiveServer) -> None:
    texts = [f"text {i} " + "あいうえお"[i % 5] * (i % 7 + 1) for i in range(100)]
    reply = embed(fake_server, {"input": texts, "model": EMBEDDINGS_MODEL})
    expected = np.stack([fake_text_vector(t) for t in texts])
    np.testing.assert_allclose(vectors(reply), expected, rtol=1e-6)


# --- encoding_format --------------------------------------------------------------


@pytest.mark.parametrize("fmt", [None, "float"])
def test_float_format_gives_lists(fake_server: LiveServer, fmt: str | None) -> None:
    body: dict[str, Any] = {"input": ["東京", "大阪"]}
    if fmt is not None:
        body["encoding_format"] = fmt
    reply = embed(fake_server, body)
    for text, item in zip(["東京", "大阪"], reply["data"], strict=True):
        assert isinstance(item["embedding"], list)
        np.testing.assert_allclose(item["embedding"], fake_text_vector(text), rtol=1e-6)


def test_base64_is_little_endian_float32_of_the_same_vector(embeddings_server: LiveServer) -> None:
    """What the openai Node SDK (and AnythingLLM on it) reads: it always decodes
    ``embedding`` as base64 of little-endian float32, and a float list becomes garbage."""
    texts = [JA, "瑠璃色はサファイアのような深い青色", "Dify"]
    floats = embed(embeddings_server, {"input": texts, "encoding_format": "float"})
    packed = embed(embeddings_server, {"input": texts, "encoding_format": "base64"})
    assert packed["usage"] == floats["usage"]
    for f_item, b_item in zip(floats["data"], packed["data"], strict=True):
        assert isinstance(b_item["embedding"], str)
        assert b_item["object"] == "embedding" and b_item["index"] == f_item["index"]
        raw = base64.b64decode(b_item["embedding"])
        assert len(raw) == 4 * STANDIN_DIM
        np.testing.assert_allclose(
            decode(b_item["embedding"]), np.float32(f_item["embedding"]), atol=1e-6
        )


def test_base64_exact_against_fake(fake_server: LiveServer) -> None:
    reply = embed(fake_server, {"input": "東京", "encoding_format": "base64"})
    np.testing.assert_array_equal(decode(reply["data"][0]["embedding"]), fake_text_vector("東京"))


@pytest.mark.parametrize("fmt", ["int8", "FLOAT", "", 1, "binary"])
def test_unknown_encoding_format_is_400(fake_server: LiveServer, fmt: object) -> None:
    with fake_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": "a", "encoding_format": fmt})
    assert_error(reply, 400, param="encoding_format", contains="encoding_format")


# --- dimensions ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_dimensions_truncates(embeddings_server: LiveServer, fmt: str) -> None:
    full = vectors(embed(embeddings_server, {"input": JA}))[0]
    for n in (1, 16, STANDIN_DIM):
        reply = embed(embeddings_server, {"input": JA, "dimensions": n, "encoding_format": fmt})
        got = reply["data"][0]["embedding"]
        got = decode(got) if fmt == "base64" else np.float32(got)
        assert len(got) == n
        np.testing.assert_allclose(got, full[:n], atol=1e-6)


@pytest.mark.parametrize("field", ["dimensions", "output_dimension"])
def test_a_whole_number_with_a_fraction_is_an_integer(
    embeddings_server: LiveServer, field: str
) -> None:
    """16.0 is an integer to JSON Schema, and the OpenAPI document says integer."""
    full = vectors(embed(embeddings_server, {"input": JA}))[0]
    got = vectors(embed(embeddings_server, {"input": JA, field: 16.0}))[0]
    np.testing.assert_allclose(got, full[:16], atol=1e-6)


@pytest.mark.parametrize("dimensions", [0, -1, STANDIN_DIM + 1, 10_000, "16", 1.5, True])
def test_bad_dimensions_are_400(embeddings_server: LiveServer, dimensions: object) -> None:
    with embeddings_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": "a", "dimensions": dimensions})
    assert_error(reply, 400, param="dimensions", contains="dimensions")


# --- unknown fields, model names -----------------------------------------------------


def test_unknown_fields_are_ignored(fake_server: LiveServer) -> None:
    body = {
        "input": ["東京"],
        "user": "someone",
        "drop_params": True,
        "extra": {"nested": [1, 2]},
        "encoding_format": "float",
    }
    reply = embed(fake_server, body)
    np.testing.assert_allclose(reply["data"][0]["embedding"], fake_text_vector("東京"), rtol=1e-6)


@pytest.mark.parametrize("name", [EMBEDDINGS_MODEL, "ruri-large"])
def test_full_id_and_short_name_are_served(embeddings_server: LiveServer, name: str) -> None:
    reply = embed(embeddings_server, {"input": "a", "model": name})
    assert reply["model"] in (name, EMBEDDINGS_MODEL)
    assert len(reply["data"][0]["embedding"]) == STANDIN_DIM


@pytest.mark.parametrize("name", ["text-embedding-3-small", "cl-nagoya/ruri-base", "RURI-LARGE"])
def test_unknown_model_is_404_listing_served_names(
    embeddings_server: LiveServer, name: str
) -> None:
    with embeddings_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": "a", "model": name})
    assert_error(reply, 404, param="model", code="model_not_found", contains=EMBEDDINGS_MODEL)


# --- invalid input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        [],
        [""],
        ["ok", ""],
        ["ok", 1],
        [1, "ok"],
        ["ok", None],
        [["ok"]],
        [{"image": "ok.png"}],  # Jina's {"text": ...} is a text; an image is not
        [{"text": 5}],
        {"text": "ok"},
        None,
        1,
        1.5,
        True,
        [[1, 2], ["a"]],
        [[]],
    ],
    ids=repr,
)
def test_invalid_input_is_400_naming_input(fake_server: LiveServer, value: object) -> None:
    with fake_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": value})
    assert_error(reply, 400, param="input", contains="input")


def test_empty_item_names_its_index(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": ["ok", "fine", ""]})
    assert_error(reply, 400, param="input", contains="input[2]")


def test_missing_input_is_400(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        reply = client.post("/v1/embeddings", json={"model": EMBEDDINGS_MODEL})
    assert_error(reply, 400, param="input", contains="input")


@pytest.mark.parametrize("value", [[1, 2, 3], [[1, 2], [3]], [[9906, 1917]] * 1000])
def test_token_ids_are_400_with_the_langchain_hint(
    embeddings_server: LiveServer, value: object
) -> None:
    with embeddings_server.client() as client:
        reply = client.post(
            "/v1/embeddings",
            json={"input": value, "model": EMBEDDINGS_MODEL, "encoding_format": "base64"},
        )
    assert_error(
        reply,
        400,
        param="input",
        contains=("LangChain", "check_embedding_ctx_length=False", "ALLOW_TOKEN_IDS"),
    )


# --- token counts --------------------------------------------------------------------


def test_token_counts_are_the_tokenizers_own(
    embeddings_server: LiveServer, ruri_tokenizer: Any
) -> None:
    texts = [
        JA,
        "瑠璃色",
        "Dify uses an OpenAI-compatible API.",
        "絵文字😀と記号！？",
        japanese_text(3000, seed=7),  # far over 512 tokens: truncated
    ]
    counts = [
        len(ruri_tokenizer(text, truncation=True, max_length=512)["input_ids"]) for text in texts
    ]
    assert counts[-1] == 512
    assert min(counts) >= 3  # [CLS] ... [SEP]: special tokens are counted
    for text, count in zip(texts, counts, strict=True):
        assert embed(embeddings_server, {"input": text})["usage"]["prompt_tokens"] == count
    assert embed(embeddings_server, {"input": texts})["usage"]["total_tokens"] == sum(counts)


# --- huge inputs: the MeCab crash --------------------------------------------------------


def test_multi_megabyte_inputs_are_answered_and_the_server_survives(
    cli_embeddings_server: LiveServer,
) -> None:
    """A subprocess server: if MeCab saw these texts whole, the process would die."""
    server = cli_embeddings_server
    huge_ascii = "a" * 3_000_000
    huge_japanese = japanese_text(1_000_000, seed=3)  # about 3 MB of UTF-8
    assert len(huge_japanese.encode()) > 2_500_000
    with server.client() as client:
        for text in (huge_ascii, huge_japanese):
            reply = client.post("/v1/embeddings", json={"input": text})
            assert reply.status_code == 200, reply.text[:500]
            body = reply.json()
            assert len(body["data"][0]["embedding"]) == STANDIN_DIM
            assert body["usage"]["prompt_tokens"] == 512
        reply = client.post("/v1/embeddings", json={"input": [JA, "a" * 2_000_000, JA]})
        assert reply.status_code == 200, reply.text[:500]
        assert len(reply.json()["data"]) == 3
        assert client.get("/health").status_code == 200
        assert client.post("/v1/embeddings", json={"input": JA}).status_code == 200
    assert server.process is not None and server.process.poll() is None, server.log()
    log = server.log()
    assert "aaaaaaaa" not in log and JA not in log and huge_japanese[:20] not in log  # no texts


MECAB_CRASH = f"""
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({EMBEDDINGS_MODEL!r})
tokenizer("a" * 300_000)
"""


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FOS_PROVE_MECAB_CRASH") != "1",
    reason="costs about 30 s of CPU; set FOS_PROVE_MECAB_CRASH=1 to run",
)
def test_the_crash_is_real_without_the_cut(cli_env: dict[str, str]) -> None:
    """Without the server's cut, the same tokenizer kills its whole process (SIGSEGV)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", MECAB_CRASH],
            env={**os.environ, **cli_env},
            capture_output=True,
            timeout=240,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("MeCab neither crashed nor finished on 300,000 characters in 240 s here")
    if done.returncode == 0:
        pytest.skip("MeCab survived 300,000 characters on this machine")
    assert done.returncode == -signal.SIGSEGV, done.stderr[-2000:]


def test_input_over_max_input_chars_is_400_naming_the_limit(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": ["ok", "a" * 1_000_001]})
        assert_error(reply, 400, param="input", contains=("input[1]", "MAX_INPUT_CHARS"))
        assert client.post("/v1/embeddings", json={"input": "a" * 1_000_000}).status_code == 200


def test_too_many_inputs_is_400_naming_the_limit(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        assert client.post("/v1/embeddings", json={"input": ["a"] * 2048}).status_code == 200
        reply = client.post("/v1/embeddings", json={"input": ["a"] * 2049})
    assert_error(reply, 400, param="input", contains="MAX_INPUTS=2048")
