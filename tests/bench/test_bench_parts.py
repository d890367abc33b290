"""The benchmark's own parts, quickly: its HTTP client, process-tree meters, GPU
sampler without a GPU, the /metrics parsing of the queue-lag benchmark, and the
null stand-ins it measures the server's own ceiling with."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import measure
from bench.client import Connection, encode_request, open_connections, run_users
from bench.queue_lag import metric_samples, summarize_lag


# --- the client ------------------------------------------------------------------------
async def _serve_replies(replies: list[bytes]) -> tuple[asyncio.Server, str, list[bytes]]:
    """A socket server that answers each request on a connection with the next reply."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            received.append(head + await reader.readexactly(length))
            writer.write(reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", received


def test_client_reads_length_and_chunked_replies_on_one_connection() -> None:
    replies = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 4\r\n\r\nbusy",
    ]

    async def scenario() -> list[tuple[int, bytes]]:
        server, url, received = await _serve_replies(replies)
        async with server:
            connection = Connection(url)
            request = encode_request(url, "POST", "/v1/embeddings", b'{"input": ["x"]}')
            out = [await connection.request(request) for _ in replies]
            await connection.close()
        assert received[0].startswith(b"POST /v1/embeddings HTTP/1.1\r\nhost: 127.0.0.1:")
        assert received[0].endswith(b'content-length: 16\r\n\r\n{"input": ["x"]}')
        return out

    assert asyncio.run(scenario()) == [(200, b"hello"), (200, b"abcde"), (429, b"busy")]


def test_run_users_keeps_request_order_and_raises_on_errors() -> None:
    ok = [f"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{i}".encode() for i in range(3)]

    async def scenario(replies: list[bytes]) -> list[bytes]:
        server, url, _ = await _serve_replies(replies)
        async with server:
            connections = await open_connections(url, 1)
            request = encode_request(url, "GET", "/health")
            bodies, latencies = await run_users(connections, [request] * len(replies))
            assert all(t > 0 for t in latencies)
        return bodies

    assert asyncio.run(scenario(ok)) == [b"0", b"1", b"2"]
    failing = [*ok[:1], b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 2\r\n\r\nno"]
    with pytest.raises(RuntimeError, match="500"):
        asyncio.run(scenario(failing))


# --- process-tree meters -------------------------------------------------------------------
BUSY_CHILD = (
    "import subprocess, sys; "
    "subprocess.run([sys.executable, '-c', "
    "'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.4: pass']); "
    "import time; time.sleep(0.5)"
)


def test_tree_cpu_counts_a_child_that_has_exited() -> None:
    parent = subprocess.Popen([sys.executable, "-c", BUSY_CHILD])
    try:
        before = measure.tree_cpu(parent.pid)
        seen = set()
        deadline = time.monotonic() + 10
        while parent.poll() is None and time.monotonic() < deadline:
            seen.add(len(measure.process_tree(parent.pid)))
            cpu = measure.tree_cpu(parent.pid)
            time.sleep(0.05)
        assert max(seen) == 2  # the parent and its busy child
        assert cpu - before >= 0.35  # the child's CPU, also once it has exited and been reaped
    finally:
        parent.kill()
        parent.wait()


def test_gpu_sampler_without_a_gpu_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure.shutil, "which", lambda _name: None)
    monkeypatch.setattr(measure.GpuSampler, "_torch_sample", staticmethod(lambda: None))
    with measure.sample_gpu("cuda") as sampler:
        assert sampler is not None
        meter = measure.Meter()
        time.sleep(0.05)
        out = meter.stop()
    assert sampler.source == "none"
    assert out["gpu_busy"] is None and out["gpu_samples"] == 0
    with measure.sample_gpu("cpu") as none:
        assert none is None
        assert "gpu_busy" not in measure.Meter().stop()


def _fake_smi(folder: Path, body: str) -> None:
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)


def test_gpu_sampler_reads_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in nvidia-smi: checks the query it is given and prints a sample every 0.05 s.
    _fake_smi(
        tmp_path,
        'case "$*" in *--query-gpu=utilization.gpu,memory.used*--loop-ms=200*) ;; '
        "*) exit 2;; esac\n"
        "while true; do echo '75, 1234'; sleep 0.05; done\n",
    )
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with measure.sample_gpu("cuda") as sampler:
        meter = measure.Meter()
        time.sleep(0.5)
        out = meter.stop()
    assert sampler is not None and sampler.source == "nvidia-smi"
    assert out["gpu_busy"] == pytest.approx(0.75)
    assert out["gpu_memory_mib"] == 1234.0
    assert out["gpu_samples"] >= 3


def test_gpu_sampler_falls_back_when_nvidia_smi_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_smi(tmp_path, "echo 'No devices were found'; exit 6\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(measure.GpuSampler, "_torch_sample", staticmethod(lambda: None))
    with measure.sample_gpu("cuda") as sampler:
        assert sampler is not None and sampler.source == "none"
        assert measure.Meter().stop()["gpu_busy"] is None


def test_gpu_sampler_window_skips_the_sample_that_began_before_it() -> None:
    sampler = measure.GpuSampler()
    sampler.samples = [(1.0, 10.0, 100.0), (1.2, 90.0, 200.0), (1.4, 70.0, 300.0), (1.6, 80, 250)]
    window = sampler.window(1.1, 1.7)
    assert window["gpu_busy"] == pytest.approx(0.75)  # 70 and 80: the first in-window skipped
    assert window["gpu_memory_mib"] == 300.0


# --- /metrics parsing (queue lag) ------------------------------------------------------
def test_lag_metric_as_histogram_gauge_or_absent() -> None:
    first = metric_samples(
        'fos_event_loop_lag_seconds_bucket{le="0.01"} 10\n'
        'fos_event_loop_lag_seconds_bucket{le="0.1"} 10\n'
        'fos_event_loop_lag_seconds_bucket{le="+Inf"} 10\n'
        "fos_event_loop_lag_seconds_count 10\nfos_event_loop_lag_seconds_sum 0.02\n",
        "fos_event_loop_lag_seconds",
    )
    last = metric_samples(
        'fos_event_loop_lag_seconds_bucket{le="0.01"} 100\n'
        'fos_event_loop_lag_seconds_bucket{le="0.1"} 109\n'
        'fos_event_loop_lag_seconds_bucket{le="+Inf"} 110\n'
        "fos_event_loop_lag_seconds_count 110\nfos_event_loop_lag_seconds_sum 1.02\n"
        "fos_event_loop_lag_seconds_other 5\n",
        "fos_event_loop_lag_seconds",
    )
    summary = summarize_lag("fos_event_loop_lag_seconds", first, [last])
    assert summary["observations"] == 100
    assert summary["mean_s"] == pytest.approx(0.01)
    assert summary["p99_at_most_s"] == 0.1
    assert summary["max_at_most_s"] == float("inf")

    gauge = [metric_samples(f"lag {v}\nlagging 9\n", "lag") for v in (0.001, 0.004)]
    assert summarize_lag("lag", {}, gauge) == {
        "metric": "lag",
        "gauge_max_s": 0.004,
        "gauge_mean_s": pytest.approx(0.0025),
    }
    assert summarize_lag("lag", {}, [metric_samples("other 1\n", "lag")]) is None


# --- the null stand-ins ------------------------------------------------------------------
@pytest.mark.slow
def test_null_standins_load_and_run_with_the_real_tokenizers(tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from tests.support import standins

    embedder = SentenceTransformer(str(standins.build_ruri_large(tmp_path, "null")), device="cpu")
    assert embedder[0].auto_model.config.num_hidden_layers == 0
    assert len(embedder.tokenizer) == standins.BERT_SHAPES["small"].vocab_size  # the same vocab
    assert type(embedder.tokenizer).__name__ == "BertJapaneseTokenizer"
    vectors = embedder.encode(["瑠璃色の空", standins.japanese_text(300, 1)])
    assert vectors.shape == (2, 8)
    assert abs(float((vectors[0] - vectors[1]).sum())) > 0

    reranker = CrossEncoder(str(standins.build_reranker(tmp_path, "null")), device="cpu")
    assert reranker.model.config.num_hidden_layers == 1
    scores = reranker.predict([("質問", "東京"), ("質問", standins.japanese_text(300, 2))])
    assert scores.shape == (2,) and scores[0] != scores[1]
