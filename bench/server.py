"""The server as a subprocess, and the scenarios run against it over HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bench.measure import Meter, peak_rss_mib, reset_peak_rss
from bench.workload import EMBED_MODEL, READY_TIMEOUT, RERANK_MODEL, Plan


# --- the server ---------------------------------------------------------------------
@dataclass
class Server:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    startup_s: float
    startup_peak_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    peak_resets: bool = True

    @property
    def pid(self) -> int:
        return self.process.pid


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_env(
    hf_home: Path, service_type: str, device: str, port: int, settings: dict[str, str]
) -> dict[str, str]:
    """This environment minus anything the server would read as a setting; then ours."""
    from fake_openai_server.settings import Settings

    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    env.pop("HF_HUB_CACHE", None)
    env.update(
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
        SERVICE_TYPE=service_type,
        HOST="127.0.0.1",
        PORT=str(port),
        DEVICE=device,
        LOG_LEVEL="warning",
    )
    env.update(settings)
    return env


@contextlib.contextmanager
def serve(
    hf_home: Path,
    service_type: str,
    device: str,
    log_dir: Path,
    settings: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``python -m fake_openai_server`` with default settings (plus ``settings``), ready."""
    port = _free_port()
    log_path = log_dir / f"server-{service_type}.log"
    started = time.perf_counter()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fake_openai_server"],
            env=_server_env(hf_home, service_type, device, port, settings or {}),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base_url, process, log_path)
        server = Server(base_url, process, log_path, time.perf_counter() - started)
        server.startup_peak_rss_mib = peak_rss_mib(process.pid)
        server.peak_rss_mib = server.startup_peak_rss_mib
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(base_url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"the server exited with code {process.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            reply = httpx.get(f"{base_url}/ready", timeout=5)
            if reply.status_code == 200:
                return
            if reply.json().get("status") == "failed":
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"the server failed to load its model:\n{tail}")
        time.sleep(0.25)
    raise TimeoutError(f"{base_url} not ready after {READY_TIMEOUT:.0f}s")


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Any:
    reply = await client.post(
        path, content=orjson.dumps(body), headers={"content-type": "application/json"}
    )
    if reply.status_code != 200:
        raise RuntimeError(f"POST {path}: {reply.status_code} {reply.text[:500]}")
    return orjson.loads(reply.content)


def _vectors(reply: Any, n: int) -> np.ndarray:
    data = reply["data"]
    if len(data) != n or [d["index"] for d in data] != list(range(n)):
        raise RuntimeError(f"expected {n} embeddings in order, got {len(data)}")
    rows = [
        np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        if isinstance(d["embedding"], str)
        else np.asarray(d["embedding"], dtype=np.float32)
        for d in data
    ]
    return np.stack(rows)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    dots = (a * b).sum(axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((dots / np.maximum(norms, 1e-30)).min())


def _engine_delta(before: dict[str, Any], after: dict[str, Any], wall: float) -> dict[str, Any]:
    d = {k: after[k] - before[k] for k in ("batches", "items", "tokens", "padded_tokens")}
    busy = after["busy_seconds"] - before["busy_seconds"]
    return {
        "forward_batches": d["batches"],
        "forward_ms_mean": 1000 * busy / d["batches"] if d["batches"] else 0.0,
        "mean_batch_size": d["items"] / d["batches"] if d["batches"] else 0.0,
        "tokens": d["tokens"],
        "padding_efficiency": d["tokens"] / d["padded_tokens"] if d["padded_tokens"] else 0.0,
        "model_busy_fraction": busy / wall if wall else 0.0,
    }


async def _engine(client: httpx.AsyncClient, model: str) -> dict[str, Any]:
    reply = await client.get("/info")
    reply.raise_for_status()
    stats: dict[str, Any] = reply.json()["engine"][model]
    return stats


_BUCKET = re.compile(r"^fos_batch_items_bucket\{(?P<labels>[^}]*)\} (?P<count>\S+)$")


async def _batch_buckets(client: httpx.AsyncClient, model: str) -> dict[float, float]:
    """Cumulative forward-pass counts by batch size (``le``) from /metrics; {} if absent."""
    reply = await client.get("/metrics")
    if reply.status_code != 200:
        return {}
    buckets: dict[float, float] = {}
    for line in reply.text.splitlines():
        match = _BUCKET.match(line)
        if match and f'model="{model}"' in match["labels"]:
            le = re.search(r'le="([^"]+)"', match["labels"])
            if le:
                buckets[float(le[1])] = float(match["count"])
    return buckets


def _histogram(before: dict[float, float], after: dict[float, float]) -> dict[str, int]:
    """Forward passes per batch-size range in one scenario, e.g. {"1": 3, "17-32": 5}."""
    out: dict[str, int] = {}
    below = 0.0
    previous = 0.0
    for le in sorted(after):
        count = after[le] - before.get(le, 0.0)
        if count - below > 0:
            low = int(previous) + 1
            label = "+" if le == float("inf") else str(int(le))
            name = f"{low}" if label == str(low) else f"{low}-{label}".replace("-+", "+")
            out[name] = int(count - below)
        below = count
        previous = le
    return out


async def measured(
    server: Server,
    client: httpx.AsyncClient,
    model: str,
    work: Callable[[], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """Run one scenario with the engine's counters, CPU meters and a fresh peak-RSS window."""
    server.peak_resets = reset_peak_rss(server.pid) and server.peak_resets
    before = await _engine(client, model)
    buckets = await _batch_buckets(client, model)
    meter = Meter(server.pid)
    result = await work()
    meters = meter.stop()
    after = await _engine(client, model)
    result.update(meters)
    result.update(_engine_delta(before, after, meters["wall_s"]))
    result["batch_histogram"] = _histogram(buckets, await _batch_buckets(client, model))
    result["peak_rss_mib"] = peak_rss_mib(server.pid)
    server.peak_rss_mib = max(server.peak_rss_mib, result["peak_rss_mib"])
    return result


def _latencies(values: list[float]) -> dict[str, float]:
    ms = sorted(1000 * v for v in values)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"p50_ms": statistics.median(ms), "p99_ms": p99, "mean_ms": statistics.fmean(ms)}


async def embeddings_scenarios(
    server: Server, plan: Plan, texts: dict[str, list[str]]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scenarios 1, 2 (and 2u: the same with 300-character texts) and 3, for the keys given.

    ``texts`` maps a scenario to its texts: one request each for 1, 2 and 2u, all in
    each of ``plan.bulk_repeats`` requests for 3. Returns results and the vectors.
    """
    limits = httpx.Limits(max_connections=plan.clients + 4, max_keepalive_connections=plan.clients)
    outputs: dict[str, np.ndarray] = {}
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=3600, limits=limits) as client:
        # Untimed: open a connection, touch the route once.
        await _post(client, "/v1/embeddings", {"model": EMBED_MODEL, "input": ["準備"]})

        async def one_text(text: str) -> np.ndarray:
            # What Dify sends: one text, no encoding_format (floats back).
            reply = await _post(client, "/v1/embeddings", {"model": EMBED_MODEL, "input": [text]})
            vector: np.ndarray = _vectors(reply, 1)[0]
            return vector

        async def sequential(key: str) -> dict[str, Any]:
            times, rows = [], []
            for text in texts[key]:
                started = time.perf_counter()
                rows.append(await one_text(text))
                times.append(time.perf_counter() - started)
            outputs[key] = np.stack(rows)
            return {"requests": len(rows), "texts": len(rows), **_latencies(times)}

        async def concurrent(key: str) -> dict[str, Any]:
            queue = deque(enumerate(texts[key]))
            rows: list[np.ndarray | None] = [None] * len(queue)

            async def user() -> None:
                while queue:
                    index, text = queue.popleft()
                    rows[index] = await one_text(text)

            await asyncio.gather(*(user() for _ in range(min(plan.clients, len(rows)))))
            outputs[key] = np.stack([r for r in rows if r is not None])
            return {"requests": len(rows), "texts": len(rows), "clients": plan.clients}

        async def bulk(key: str) -> dict[str, Any]:
            body = {"model": EMBED_MODEL, "input": texts[key], "encoding_format": "base64"}
            for _ in range(plan.bulk_repeats):
                reply = await _post(client, "/v1/embeddings", body)
                outputs[key] = _vectors(reply, len(texts[key]))
            return {"requests": plan.bulk_repeats, "texts": len(texts[key]) * plan.bulk_repeats}

        kinds = {"1": sequential, "2": concurrent, "2u": concurrent, "3": bulk}
        for key in texts:
            result = await measured(server, client, EMBED_MODEL, partial(kinds[key], key))
            result["per_s"] = result["texts"] / result["wall_s"]
            results[key] = result
    return results, outputs


async def rerank_scenarios(
    server: Server, plan: Plan, query: str, documents: list[str]
) -> tuple[dict[str, Any], np.ndarray]:
    limits = httpx.Limits(max_connections=plan.rerank_clients + 4)
    body = {"model": RERANK_MODEL, "query": query, "documents": documents, "top_n": len(documents)}
    last: list[np.ndarray] = []
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=3600, limits=limits) as client:
        await _post(client, "/v1/rerank", {**body, "documents": documents[:2], "top_n": 2})

        async def one() -> float:
            # Dify's call: {model, query, documents, top_n}.
            started = time.perf_counter()
            reply = await _post(client, "/v1/rerank", body)
            scores = np.full(len(documents), np.nan, dtype=np.float32)
            for item in reply["results"]:
                scores[item["index"]] = item["relevance_score"]
            if np.isnan(scores).any():
                raise RuntimeError("rerank reply misses documents")
            last[:] = [scores]
            return time.perf_counter() - started

        async def sequential() -> dict[str, Any]:
            times = [await one() for _ in range(plan.rerank_sequential)]
            return {"requests": plan.rerank_sequential, **_latencies(times)}

        async def concurrent() -> dict[str, Any]:
            remaining = [plan.rerank_concurrent]
            times: list[float] = []

            async def user() -> None:
                while remaining[0] > 0:
                    remaining[0] -= 1
                    times.append(await one())

            await asyncio.gather(*(user() for _ in range(plan.rerank_clients)))
            return {
                "requests": plan.rerank_concurrent,
                "clients": plan.rerank_clients,
                **_latencies(times),
            }

        for key, work in (("4-sequential", sequential), ("4-concurrent", concurrent)):
            result = await measured(server, client, RERANK_MODEL, work)
            result["pairs"] = result["requests"] * len(documents)
            result["per_s"] = result["pairs"] / result["wall_s"]
            results[key] = result
    return results, last[0]


async def server_dtype(server: Server, model: str) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        reply = await client.get("/info")
        info = reply.json()["models"][model]
    return {"dtype": info["dtype"], "reason": info["dtype_reason"]}
