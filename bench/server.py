"""The server as a subprocess, and the scenarios run against it over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bench.client import (
    Connection,
    HTTPError,
    close_all,
    encode_request,
    open_connections,
    run_users,
)
from bench.measure import Meter, peak_rss_mib, reset_peak_rss
from bench.workload import EMBED_MODEL, READY_TIMEOUT, RERANK_MODEL, Plan
from tests.support.live import ROOT, LiveServer, free_port, stop_process, wait_ready


# --- the options every benchmark shares -------------------------------------------------
def parse_with_server_options(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """``argv`` parsed with ``parser``'s own options and those every benchmark shares:
    where results go, where the stand-ins are, the server's source tree and settings
    (``--server-env`` becomes a dict); what cannot work is refused."""
    _add_server_options(parser)
    args = parser.parse_args(argv)
    _check_server_options(parser, args)
    return args


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", help="added to the results' file names (e.g. before, after)")
    parser.add_argument(
        "--hf-home",
        type=Path,
        help="where the stand-ins go (default: a temporary folder, removed afterwards)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="use the stand-ins already under --hf-home"
    )
    parser.add_argument(
        "--server-env",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="settings for the server beyond its defaults (e.g. MAX_BATCH_SIZE=32 DTYPE=int8)",
    )
    parser.add_argument(
        "--server-src",
        type=Path,
        metavar="PATH",
        help="run the server from this source tree (its src/ first on PYTHONPATH), e.g. a "
        "`git worktree` of an older commit: the same harness measures before and after",
    )


def env_pairs(parser: argparse.ArgumentParser, option: str, items: list[str]) -> dict[str, str]:
    """``option``'s NAME=VALUE items as settings (names upper-cased)."""
    pairs = [item.partition("=") for item in items]
    if any(not name or not sep for name, sep, _ in pairs):
        parser.error(f"{option} takes NAME=VALUE pairs")
    return {name.upper(): value for name, _, value in pairs}


def _check_server_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.server_env = env_pairs(parser, "--server-env", args.server_env)
    if args.reuse and args.hf_home is None:
        parser.error("--reuse needs --hf-home")
    if (
        args.server_src is not None
        and not (args.server_src / "src" / "fake_openai_server").is_dir()
    ):
        parser.error(f"--server-src {args.server_src}: no src/fake_openai_server there")


# --- the server ---------------------------------------------------------------------
@dataclass
class Server(LiveServer):
    """The server subprocess (``process``, ``pid``, ``log_path``), with how long it took
    to become ready and its peak memory."""

    startup_s: float = 0.0
    startup_peak_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    peak_resets: bool = True


def _server_env(
    hf_home: Path,
    service_type: str,
    device: str,
    port: int,
    settings: dict[str, str],
    server_src: Path | None = None,
) -> dict[str, str]:
    """This environment minus anything the server would read as a setting; then ours.

    The ``src`` of ``server_src`` (another commit's tree), else of this tree, comes first
    on PYTHONPATH: the server runs from that tree, the benchmark from this one, and both
    sides of an A/B start the same way.
    """
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
    tree = server_src.resolve() if server_src is not None else ROOT
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def source_info(server_src: Path | None) -> dict[str, Any]:
    """The tree the server runs from: its path, git commit and subject (or a COMMIT file),
    and the file Python imports the package from with that environment."""
    tree = (server_src or Path(__file__).resolve().parents[1]).resolve()
    info: dict[str, Any] = {"path": str(tree), "this_tree": server_src is None}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["git", "-C", str(tree), "log", "-1", "--format=%H%n%s"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.splitlines()
        info["commit"], info["subject"] = out[0], out[1] if len(out) > 1 else ""
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no", "src"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        info["dirty"] = bool(dirty)
    # bench/gpu.sh writes COMMIT: the device's copy of the checkout carries the commits
    # made since the session began as uncommitted changes on an older HEAD.
    if (tree / "COMMIT").is_file():
        info["commit"] = (tree / "COMMIT").read_text().strip()
        info.pop("subject", None)
        info["dirty"] = False
    env = _server_env(Path("/nonexistent"), "embeddings", "cpu", 1, {}, server_src)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["imported_from"] = subprocess.run(
            [sys.executable, "-c", "import fake_openai_server as m; print(m.__file__)"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    return info


@contextlib.contextmanager
def serve(
    hf_home: Path,
    service_type: str,
    device: str,
    log_dir: Path,
    settings: dict[str, str] | None = None,
    server_src: Path | None = None,
    python_args: Sequence[str] = (),
    fakes: dict[str, Any] | None = None,
) -> Iterator[Server]:
    """``python -m fake_openai_server`` with default settings (plus ``settings``), ready.

    From ``server_src`` (another source tree) when given, else from this one;
    ``python_args`` go before ``-m`` (``bench.calls`` runs the server under cProfile).
    With ``fakes`` (the fake models' options, ``tests/support/fakes.py``), the CLI's same
    serving path over the fake models instead of the stand-ins.
    """
    port = free_port()
    log_path = log_dir / f"server-{service_type}.log"
    started = time.perf_counter()
    module = ["fake_openai_server"]
    if fakes is not None:  # tests.support from this repository, whatever the cwd
        module = ["tests.support.fake_cli", "{}", json.dumps(fakes)]
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        settings = {**(settings or {}), "PYTHONPATH": path}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, *python_args, "-m", *module],
            env=_server_env(hf_home, service_type, device, port, settings or {}, server_src),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, READY_TIMEOUT, process, log_path, interval=0.25)
        server = Server(
            base_url, process=process, log_path=log_path, startup_s=time.perf_counter() - started
        )
        server.startup_peak_rss_mib = peak_rss_mib(process.pid)
        server.peak_rss_mib = server.startup_peak_rss_mib
        yield server
    finally:
        stop_process(process, timeout=60)


def tell_server_logs(log_dir: Path, say: Callable[[str], None]) -> None:
    """The last lines of every server log under ``log_dir``: the server's side of what
    went wrong, said before a benchmark that failed re-raises."""
    for log in sorted(log_dir.rglob("*.log")):
        name = log.relative_to(log_dir)
        say(f"{name}, last lines:\n{log.read_text(errors='replace')[-3000:]}")


def _json(reply: bytes) -> Any:
    return orjson.loads(reply)


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


# --- what the server says about itself (tolerant: another tree may say less) -----------
_ENGINE_KEYS = ("batches", "items", "tokens", "padded_tokens", "busy_seconds")


def _engine_delta(
    before: dict[str, Any] | None, after: dict[str, Any] | None, wall: float
) -> dict[str, Any]:
    """Forward passes, mean batch, padding, model-busy share, CUDA-graph share and how
    long the engine had none of the model's batches from /info's engine stats.

    All None when the server does not publish them (``engine`` missing in /info).
    """
    if not before or not after or not all(k in after for k in _ENGINE_KEYS):
        return dict.fromkeys(
            (
                "forward_batches",
                "forward_ms_mean",
                "mean_batch_size",
                "tokens",
                "padding_efficiency",
                "model_busy_fraction",
                "graph_fraction",
                "starved_fraction",
                "drained_fraction",
                "queue_wait_ms",
            )
        )
    d = {k: after[k] - before[k] for k in _ENGINE_KEYS}
    batches = d["batches"]
    return {
        "forward_batches": batches,
        "forward_ms_mean": 1000 * d["busy_seconds"] / batches if batches else 0.0,
        "mean_batch_size": d["items"] / batches if batches else 0.0,
        "tokens": d["tokens"],
        "padding_efficiency": d["tokens"] / d["padded_tokens"] if d["padded_tokens"] else None,
        "model_busy_fraction": d["busy_seconds"] / wall if wall else 0.0,
        # Passes that replayed a CUDA graph (a tree that does not count them: None).
        "graph_fraction": (after["graph_batches"] - before.get("graph_batches", 0)) / batches
        if batches and "graph_batches" in after
        else None,
        # No batch of the model in the engine process: nothing was queued (a tree that
        # does not count it: None).
        "starved_fraction": _counted(before, after, "starved_seconds") / wall
        if wall and "starved_seconds" in after
        else None,
        # Batches that took the last queued item: the queue ran dry behind them.
        "drained_fraction": _counted(before, after, "drained_batches") / batches
        if batches and "drained_batches" in after
        else None,
        # An item's mean wait in the queue, from arrival to its batch's dispatch.
        "queue_wait_ms": 1000 * _counted(before, after, "queued_seconds") / d["items"]
        if d["items"] and "queued_seconds" in after
        else None,
    }


def _counted(before: dict[str, Any], after: dict[str, Any], key: str) -> float:
    return float(after[key] - before.get(key, 0))


async def _engine(client: httpx.AsyncClient, model: str) -> dict[str, Any] | None:
    reply = await client.get("/info")
    reply.raise_for_status()
    stats = reply.json().get("engine", {}).get(model)
    return stats if isinstance(stats, dict) else None


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
    """Run one scenario with the engine's counters, meters and a fresh peak-RSS window.

    CPU and peak RSS cover the server's whole process tree (the server and every
    process it started: an engine or tokenizer workers).
    """
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
    if result.get("requests"):
        result["client_us_per_request"] = 1e6 * result["client_cpu_s"] / result["requests"]
    return result


def _latencies(values: list[float]) -> dict[str, float]:
    ms = sorted(1000 * v for v in values)
    p90, p99 = (ms[min(len(ms) - 1, round(q * (len(ms) - 1)))] for q in (0.9, 0.99))
    return {
        "p50_ms": statistics.median(ms),
        "p90_ms": p90,
        "p99_ms": p99,
        "mean_ms": statistics.fmean(ms),
    }


async def _users(
    server: Server, requests: list[bytes], users: int
) -> tuple[list[bytes], dict[str, Any]]:
    """Send ``requests`` from ``users`` keep-alive connections (opened beforehand)."""
    connections = await open_connections(server.base_url, min(users, len(requests)))
    try:
        bodies, times = await run_users(connections, requests)
    finally:
        await close_all(connections)
    return bodies, {"requests": len(requests), "clients": users, **_latencies(times)}


def _post(server: Server, path: str, body: dict[str, Any]) -> bytes:
    return encode_request(server.base_url, "POST", path, orjson.dumps(body))


# --- the scenarios -------------------------------------------------------------------
def embed_clients(plan: Plan, key: str) -> int:
    return {
        "1": 1,
        "2": plan.clients,
        "2-256": plan.many_clients,
        "2u": plan.uniform_clients,
        "3": 1,
        "5": BESIDE_BULK_CLIENTS,
    }[key]


# Scenario 5: chat users (one text per request, a short pause between a reply and their
# next request) while a client's bulk job (requests of the bulk scenario's texts, base64,
# one after another) runs: what a short request waits behind a long one.
BESIDE_BULK_CLIENTS = 16
BESIDE_BULK_PAUSE_S = 0.02


async def _beside_bulk(
    server: Server, singles: list[bytes], bulk: bytes, bulk_texts: int
) -> tuple[list[bytes], dict[str, Any]]:
    """``singles`` from BESIDE_BULK_CLIENTS clients while ``bulk`` (of ``bulk_texts``
    texts) is sent again and again until they are done; latencies are the singles'."""
    connections = await open_connections(server.base_url, BESIDE_BULK_CLIENTS + 1)
    bodies: list[bytes] = [b""] * len(singles)
    times: list[float] = []
    bulk_done = 0
    finished = asyncio.Event()

    async def user(connection: Connection, first: int) -> None:
        for index in range(first, len(singles), BESIDE_BULK_CLIENTS):
            started = time.perf_counter()
            status, bodies[index] = await connection.request(singles[index])
            times.append(time.perf_counter() - started)
            if status != 200:
                raise HTTPError(f"HTTP {status}: {bodies[index][:200]!r}")
            await asyncio.sleep(BESIDE_BULK_PAUSE_S)

    async def bulk_client(connection: Connection) -> None:
        nonlocal bulk_done
        while not finished.is_set():
            status, body = await connection.request(bulk)
            if status != 200:
                raise HTTPError(f"HTTP {status}: {body[:200]!r}")
            bulk_done += 1

    try:
        bulk_started = time.perf_counter()
        bulk_task = asyncio.ensure_future(bulk_client(connections[-1]))
        await asyncio.sleep(0.2)  # the bulk job is under way before the first chat user
        started = time.perf_counter()
        await asyncio.gather(*(user(c, i) for i, c in enumerate(connections[:-1])))
        wall = time.perf_counter() - started
        finished.set()
        await bulk_task  # its last request counts too
        bulk_wall = time.perf_counter() - bulk_started
    finally:
        await close_all(connections)
    return bodies, {
        "requests": len(singles),
        "clients": BESIDE_BULK_CLIENTS,
        **_latencies(times),
        "bulk_requests": bulk_done,
        "bulk_texts_per_s": bulk_done * bulk_texts / bulk_wall,
        "one_text_per_s": len(singles) / wall,
    }


async def embeddings_scenarios(
    server: Server, plan: Plan, texts: dict[str, list[str]]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scenario 0 (GET /health) and scenarios 1, 2, 2-256, 2u and 3, for the keys given.

    ``texts`` maps a scenario to its texts: one request each for 1, 2, 2-256 and 2u,
    all of them in each of ``plan.bulk_repeats`` requests for 3. Every request is
    encoded before the clock starts and decoded after it stops. Returns results and
    the vectors.
    """
    outputs: dict[str, np.ndarray] = {}
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=3600) as client:
        # Untimed: touch the route once.
        warm = await client.post(
            "/v1/embeddings", json={"model": EMBED_MODEL, "input": ["準備"]}, timeout=600
        )
        warm.raise_for_status()

        async def health() -> dict[str, Any]:
            request = encode_request(server.base_url, "GET", "/health")
            _, result = await _users(server, [request] * plan.health_requests, plan.health_clients)
            return result

        def one_text_requests(key: str) -> list[bytes]:
            # What Dify sends: one text, no encoding_format (floats back).
            return [
                _post(server, "/v1/embeddings", {"model": EMBED_MODEL, "input": [text]})
                for text in texts[key]
            ]

        async def one_text_each(key: str) -> dict[str, Any]:
            requests = one_text_requests(key)
            bodies, result = await _users(server, requests, embed_clients(plan, key))
            outputs[key] = np.concatenate([_vectors(_json(b), 1) for b in bodies])
            return {**result, "texts": len(requests)}

        async def bulk(key: str) -> dict[str, Any]:
            body = {"model": EMBED_MODEL, "input": texts[key], "encoding_format": "base64"}
            request = _post(server, "/v1/embeddings", body)
            bodies, result = await _users(server, [request] * plan.bulk_repeats, 1)
            outputs[key] = _vectors(_json(bodies[-1]), len(texts[key]))
            return {**result, "texts": len(texts[key]) * plan.bulk_repeats}

        async def beside_bulk(key: str) -> dict[str, Any]:
            singles = one_text_requests(key)
            body = {"model": EMBED_MODEL, "input": texts["5-bulk"], "encoding_format": "base64"}
            bulk_request = _post(server, "/v1/embeddings", body)
            bodies, result = await _beside_bulk(server, singles, bulk_request, len(texts["5-bulk"]))
            outputs[key] = np.concatenate([_vectors(_json(b), 1) for b in bodies])
            bulk_texts = result["bulk_requests"] * len(texts["5-bulk"])
            return {**result, "texts": len(singles) + bulk_texts}

        result = await measured(server, client, EMBED_MODEL, health)
        result["per_s"] = result["requests"] / result["wall_s"]
        results["0"] = result
        for key in texts:
            if key == "5-bulk":
                continue  # scenario 5's bulk requests
            work = {"3": bulk, "5": beside_bulk}.get(key, one_text_each)
            result = await measured(server, client, EMBED_MODEL, partial(work, key))
            result["per_s"] = result["texts"] / result["wall_s"]
            result["requests_per_s"] = result["requests"] / result["wall_s"]
            results[key] = result
    return results, outputs


def _scores(body: bytes, n: int) -> np.ndarray:
    scores = np.full(n, np.nan, dtype=np.float32)
    for item in _json(body)["results"]:
        scores[item["index"]] = item["relevance_score"]
    if np.isnan(scores).any():
        raise RuntimeError("rerank reply misses documents")
    return scores


async def rerank_scenarios(
    server: Server, plan: Plan, query: str, documents: list[str]
) -> tuple[dict[str, Any], np.ndarray]:
    """Scenario 4: one query x ``documents``, one client, then ``plan.rerank_clients``."""
    # Dify's call: {model, query, documents, top_n}.
    body = {"model": RERANK_MODEL, "query": query, "documents": documents, "top_n": len(documents)}
    request = _post(server, "/v1/rerank", body)
    last: list[np.ndarray] = []
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=3600) as client:
        warm = await client.post(
            "/v1/rerank", json={**body, "documents": documents[:2], "top_n": 2}, timeout=600
        )
        warm.raise_for_status()

        async def run(requests: int, clients: int) -> dict[str, Any]:
            bodies, result = await _users(server, [request] * requests, clients)
            last[:] = [_scores(bodies[-1], len(documents))]
            return result

        for key, requests, clients in (
            ("4-sequential", plan.rerank_sequential, 1),
            ("4-concurrent", plan.rerank_concurrent, plan.rerank_clients),
        ):
            result = await measured(server, client, RERANK_MODEL, partial(run, requests, clients))
            result["pairs"] = result["requests"] * len(documents)
            result["per_s"] = result["pairs"] / result["wall_s"]
            result["requests_per_s"] = result["requests"] / result["wall_s"]
            results[key] = result
    return results, last[0]


async def server_dtype(server: Server, model: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        reply = await client.get("/info")
        info = reply.json().get("models", {}).get(model, {})
    return {
        "dtype": info.get("dtype", "?"),
        "reason": info.get("dtype_reason", "?"),
        "cuda_graphs": info.get("cuda_graphs"),
    }
