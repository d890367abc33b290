"""Limits: published at /info, contradictions refused at start-up; metrics exposed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from fake_openai_server.api.app import build_app
from fake_openai_server.settings import Settings
from tests.support.contract import EMBEDDINGS_MODEL
from tests.support.fakes import DIM, MAX_LENGTH, fake_plugin
from tests.support.live import LiveServer, free_port, serve_app

LIMITS: dict[str, Any] = {
    "max_request_bytes": 123_456,
    "max_inputs": 77,
    "max_documents": 55,
    "max_input_chars": 3_333,
    "max_request_tokens": 2_000,
    "max_batch_size": 16,
    "max_batch_tokens": 512,
    "max_queue_tokens": 50_000,
}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(service_type="all", warmup=False, **LIMITS)
    with serve_app(build_app(settings, fake_plugin())) as live:
        yield live


def test_info_publishes_every_limit_and_the_models(server: LiveServer) -> None:
    info = httpx.get(f"{server.base_url}/info").json()
    assert info["limits"] == {**LIMITS, "truncate": True}
    assert info["version"]
    assert info["state"] == "ready"
    embedding = info["models"]["cl-nagoya/ruri-large"]
    assert (embedding["max_length"], embedding["dimension"]) == (MAX_LENGTH, DIM)
    assert info["models"]["cl-nagoya/ruri-v3-reranker-310m"]["max_length"] == 4 * MAX_LENGTH


@pytest.mark.parametrize(
    ("path", "body", "limit"),
    [
        ("/v1/embeddings", {"input": ["a"] * 78}, "MAX_INPUTS=77"),
        ("/v1/embeddings", {"input": "a" * 3_334}, "MAX_INPUT_CHARS=3333"),
        ("/v1/embeddings", {"input": ["a" * 25] * 77 * 2}, "MAX_INPUTS=77"),
        ("/v1/embeddings", {"input": ["a" * 30] * 77}, "MAX_REQUEST_TOKENS=2000"),
        ("/v1/rerank", {"query": "q", "documents": ["a"] * 56}, "MAX_DOCUMENTS=55"),
        ("/v2/rerank", {"query": "q" * 3_334, "documents": ["a"]}, "MAX_INPUT_CHARS=3333"),
        ("/v1/embeddings", {"input": "a" * 130_000}, "MAX_REQUEST_BYTES=123456"),
        # TEI's /tokenize answers every token as an object: 8 MB of text had taken a core
        # for half a minute and 2.7 GB of memory.
        ("/tokenize", {"inputs": ["a" * 30] * 77}, "MAX_REQUEST_TOKENS=2000"),
        ("/decode", {"ids": [[100] * 30] * 77}, "MAX_REQUEST_TOKENS=2000"),
    ],
)
def test_each_limit_names_itself_and_its_value(
    server: LiveServer, path: str, body: object, limit: str
) -> None:
    reply = httpx.post(f"{server.base_url}{path}", json=body)
    assert reply.status_code in (400, 413), reply.text[:300]
    error = reply.json()["error"]
    assert limit in (error if isinstance(error, str) else error["message"])  # TEI's: a string


def test_contradictory_limits_are_refused_naming_both() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(max_queue_tokens=20_000, max_request_tokens=30_000, max_batch_tokens=1_000)
    message = str(refused.value)
    assert "MAX_QUEUE_TOKENS=20000" in message
    assert "MAX_REQUEST_TOKENS=30000" in message


def test_the_reranker_model_setting_is_checked() -> None:
    """An empty RERANKER_MODEL had failed 40 s into loading with an AttributeError; a
    carriage return from a .env file saved on Windows had become part of the id."""
    with pytest.raises(ValidationError, match="RERANKER_MODEL is empty"):
        Settings(service_type="reranker", reranker_model="  ")
    windows = Settings(reranker_model="cl-nagoya/ruri-v3-reranker-310m\r")
    assert windows.reranker_model == "cl-nagoya/ruri-v3-reranker-310m"
    assert Settings(service_type="embeddings", reranker_model="").service_type == "embeddings"


def test_log_level_in_capitals_is_accepted() -> None:
    """LOG_LEVEL=DEBUG, as Python's logging and uvicorn write it, had been refused."""
    assert Settings(log_level="DEBUG").log_level == "debug"


def _run_cli(env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "HOST": "127.0.0.1", "PORT": str(free_port()), **env}
    return subprocess.run(
        [sys.executable, "-m", "fake_openai_server"],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_cli_refuses_a_queue_smaller_than_a_request() -> None:
    done = _run_cli({"MAX_QUEUE_TOKENS": "20000", "MAX_REQUEST_TOKENS": "30000"}, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "MAX_QUEUE_TOKENS=20000" in done.stderr and "MAX_REQUEST_TOKENS=30000" in done.stderr


def test_cli_refuses_a_batch_budget_below_the_models_max_length(hf_home: Path) -> None:
    """The model's maximum length is known only once it is loaded: refused then."""
    done = _run_cli({"SERVICE_TYPE": "embeddings", "DTYPE": "float32", "MAX_BATCH_TOKENS": "256"})
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "invalid setting" in last
    assert "MAX_BATCH_TOKENS=256" in last
    assert "512" in last and "cl-nagoya/ruri-large" in last  # the model and its length
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="DEVICE=auto finds a GPU here")
def test_cli_refuses_float16_when_no_gpu_is_found() -> None:
    """DEVICE=auto (the default) on a host without a GPU resolves to the CPU, where
    DTYPE=float16 is not served: a clear refusal at start-up, not a slow half-precision
    CPU server.

    With a GPU reserved (a container's NVIDIA_VISIBLE_DEVICES) that torch cannot use (a
    driver older than its CUDA needs), the log says so: DTYPE=auto had served on the CPU,
    many times slower, without a word."""
    env = {"SERVICE_TYPE": "embeddings", "DTYPE": "float16", "NVIDIA_VISIBLE_DEVICES": "all"}
    done = _run_cli(env, timeout=180)
    # Found only once the engine resolves the device, yet a setting: exit 2 like the rest.
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fake-openai-server: invalid setting: DTYPE=float16 needs a GPU"), last
    assert "Traceback" not in done.stderr
    assert "a GPU is present (NVIDIA_VISIBLE_DEVICES=all) but torch" in done.stderr, done.stderr


# --- metrics --------------------------------------------------------------------------


def _samples(base_url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(f"{base_url}/metrics").text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_repeated_slashes_are_counted_under_their_route(server: LiveServer) -> None:
    """``//v2/rerank`` is answered as ``/v2/rerank`` (a base URL pasted with a trailing
    slash), and counted there, not as an unknown path."""

    def counted() -> float:
        samples = _samples(server.base_url).get("fos_requests_total", [])
        wanted = {"route": "/v2/rerank", "status": "200"}
        return sum(v for labels, v in samples if wanted.items() <= labels.items())

    before = counted()
    with httpx.Client() as client:
        for path in ("//v2/rerank", "/v2//rerank"):
            body = {"query": "q", "documents": ["a"]}
            assert client.post(server.base_url + path, json=body).status_code == 200
    assert counted() - before == 2


def test_metrics_cover_requests_latency_queue_batches_and_inference(server: LiveServer) -> None:
    with httpx.Client(base_url=server.base_url) as client:
        assert client.post("/v1/embeddings", json={"input": ["東京", "大阪"]}).status_code == 200
        assert client.post("/v2/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200
        assert client.post("/v1/embeddings", json={"input": ""}).status_code == 400
        assert client.get("/nowhere").status_code == 404
        azure = "/openai/deployments/{}/embeddings"
        assert client.post(azure.format("ruri-large"), json={"input": "東京"}).status_code == 200
        assert client.post(azure.format("a/b"), json={"input": "東京"}).status_code == 404
    samples = _samples(server.base_url)

    def value(name: str, **labels: str) -> float:
        return sum(v for got, v in samples.get(name, []) if labels.items() <= got.items())

    assert value("fos_requests_total", route="/v1/embeddings", status="200") >= 1
    assert value("fos_requests_total", route="/v1/embeddings", status="400") >= 1
    assert value("fos_requests_total", route="/v2/rerank", status="200") >= 1
    assert value("fos_requests_total", route="other", status="404") >= 1  # no label per path
    # Nor per Azure deployment: the route's template.
    azure = "/openai/deployments/{deployment}/embeddings"  # as OpenAPI and the README write it
    assert value("fos_requests_total", route=azure, status="200") == 1
    assert value("fos_requests_total", route=azure, status="404") == 1
    assert value("fos_request_seconds_count", route="/v1/embeddings") >= 2
    assert "fos_request_seconds_bucket" in samples
    assert value("fos_requests_in_progress", route="/metrics") == 1  # this very scrape
    model = "cl-nagoya/ruri-large"
    assert value("fos_batch_items_count", model=model) >= 1
    assert value("fos_batch_items_sum", model=model) >= 2
    assert value("fos_batch_tokens_total", model=model) >= 2
    assert value("fos_batch_padded_tokens_total", model=model) >= 2
    assert value("fos_inference_seconds_count", model=model) >= 1
    assert value("fos_inference_seconds_count", model="cl-nagoya/ruri-v3-reranker-310m") >= 1
    assert ({"model": model}, 0.0) in samples["fos_queue_tokens"]
    assert value("fos_queue_wait_seconds_count", model=model) >= 2  # one per item
    assert "fos_queue_wait_seconds_bucket" in samples
    assert value("process_resident_memory_bytes") > 10 * 2**20  # what a soak run watches
    # The engine process's own (the model's memory), beside the API process's.
    assert value("fos_engine_process_resident_memory_bytes") > 10 * 2**20
    started = value("fos_engine_process_start_time_seconds")
    assert started >= value("process_start_time_seconds") > 0  # another process, later
    assert value("fos_ready") == 1
    # Up to REQUEST_TIMEOUT's default: a 504 after 300 s is not only in +Inf.
    assert value("fos_request_seconds_bucket", route="/v1/embeddings", le="300.0") >= 2


def _vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_metrics_give_the_tokenizer_processes_memory() -> None:
    """The third kind of process (MeCab's dictionary and the tokenizers live there): a
    leak in one had shown in no series."""
    settings = Settings(service_type="embeddings", warmup=False, tokenizer_workers=2)
    app = build_app(settings, fake_plugin())
    with serve_app(app) as server:
        pids = [worker.pid for worker in app.state.runtime.tokenizers.workers]
        assert len(pids) == 2
        shown = server.metric("fos_tokenizer_processes_resident_memory_bytes")
        expected = sum(_vm_rss(pid) for pid in pids)
        assert shown > 2 * 10 * 2**20
        assert abs(shown - expected) < 0.1 * expected, (shown, expected)


def test_truncate_false_refuses_over_long_inputs_on_every_route() -> None:
    """TRUNCATE=false is the server's word for every route that does not say otherwise in
    its request: an input or query + document pair over the model's maximum length is a
    400 naming the setting (the rerank routes had cut it silently); a request that asks
    to truncate (Voyage's truncation, TEI's truncate) is still cut."""
    settings = Settings(service_type="all", warmup=False, truncate=False)
    long = "長" * (MAX_LENGTH * 8)  # over the embeddings' and the reranker's (4x) maximum
    refused: list[tuple[str, dict[str, Any]]] = [
        ("/v1/embeddings", {"input": long}),
        ("/v1/rerank", {"query": "q", "documents": ["a", long]}),
        ("/v2/rerank", {"query": "q", "documents": [long]}),
        ("/rerank", {"query": "q", "documents": [long]}),
        ("/v1/v1/rerank", {"query": "q", "documents": [long]}),
        ("/api/rerank", {"query": "q", "documents": [long]}),
        ("/rerank", {"query": "q", "texts": [long]}),  # TEI
        # The embedding routes of the other APIs, which had said "the request asked not
        # to truncate" of a request that said nothing (seen failing)
        ("/embed", {"inputs": long}),  # TEI
        ("/", {"inputs": long}),  # TEI
        ("/api/embed", {"model": EMBEDDINGS_MODEL, "input": long}),  # Ollama
        ("/api/embeddings", {"model": EMBEDDINGS_MODEL, "prompt": long}),
        ("/v2/embed", {"texts": [long], "input_type": "search_document"}),  # Cohere
    ]
    cut: list[tuple[str, dict[str, Any]]] = [
        ("/v1/embeddings", {"input": long, "truncation": True}),
        ("/v1/rerank", {"query": "q", "documents": [long], "truncation": True}),
        ("/rerank", {"query": "q", "texts": [long], "truncate": True}),
    ]
    with serve_app(build_app(settings, fake_plugin())) as live, live.client() as client:
        for path, body in refused:
            reply = client.post(path, json=body)
            assert reply.status_code == 400, (path, body.keys(), reply.text)
            assert "TRUNCATE=false" in reply.text, (path, reply.text)
        for path, body in cut:
            reply = client.post(path, json=body)
            assert reply.status_code == 200, (path, body.keys(), reply.text)
