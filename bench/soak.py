"""Soak test: mixed embeddings and rerank load against a running server, for a set time.

Not run in CI (a smoke run of a few seconds is, in tests/hardening/test_soak.py).
Start a server, then point the soak at it; for example, both APIs in one process:

    SERVICE_TYPE=all PORT=8080 uv run fake-openai-server &
    uv run python bench/soak.py --url http://127.0.0.1:8080 --seconds 1800 --concurrency 8

Options: --seconds (how long), --max-requests (a bound on the count as well),
--concurrency (clients in parallel), --api-key (when the server has API_KEYS),
--report-every (seconds between progress lines), --max-rss-growth-mb (the
threshold for the verdict), --seed.

The load mixes what the clients in docs/client-contract.md send: Dify-style
single texts, batches of 16 to 64 (RAGFlow, AnythingLLM) as float and base64,
query and document prefixes, rerank at /v1/rerank and /v2/rerank with 3 to 50
documents and various top_n, a few requests that must get 400 (empty input,
unknown model) and a few clients that give up early (short timeouts: their work
must be dropped). Only the APIs the server serves (from /info) are used.

It prints a progress line every --report-every seconds and a summary at the end:
requests by kind and status, unexpected errors (5xx, transport errors, wrong
4xx), latency p50/p99, and the resident memory of the server's API process, of its
engine process, where the model lives, and of its tokenizer processes, summed
(PROCESSES: their series on /metrics, Linux) at the start, after warm-up and at the
end. It exits 1 when a request failed unexpectedly or any of them grew by more than
--max-rss-growth-mb after warm-up, else 0.

Loopback only: a URL whose host is not 127.0.0.1, ::1 or localhost is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
WARMUP_SHARE = 0.1  # memory is measured from the end of the first tenth of the run

WORDS = (  # noqa: SIM905 - a list literal of thirty words would fill a screen
    "東京 大阪 京都 瑠璃色 深い 青 空 海 山 川 日本 首都 経済 歴史 文化 技術 研究 "
    "検索 文書 質問 回答 モデル 言語 埋め込み 再ランク 速度 品質 会議 予定 報告"
).split()


def text(rng: random.Random, low: int = 3, high: int = 60) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) + "。"


@dataclass
class Request:
    kind: str
    path: str
    body: dict[str, Any]
    expect: int = 200
    timeout: float = 60.0
    check: Callable[[httpx.Response], bool] = field(default=lambda _: True)


def _embeddings(rng: random.Random) -> Request:
    roll = rng.random()
    if roll < 0.03:
        return Request("embeddings-empty", "/v1/embeddings", {"input": [""]}, expect=400)
    if roll < 0.05:
        unknown = {"input": "x", "model": "no-such-model"}
        return Request("embeddings-unknown-model", "/v1/embeddings", unknown, expect=404)
    size = rng.choice([1, 1, 1, 4, 16, 64])
    body: dict[str, Any] = {"input": [text(rng) for _ in range(size)]}
    fmt = rng.choice([None, "float", "base64"])
    if fmt:
        body["encoding_format"] = fmt
    if rng.random() < 0.5:
        body["input_type"] = rng.choice(["query", "document"])

    def check(reply: httpx.Response) -> bool:
        data = reply.json()["data"]
        if len(data) != size:
            return False
        first = data[0]["embedding"]
        if fmt == "base64":
            return len(base64.b64decode(first)) > 0
        return len(first) > 0

    return Request(f"embeddings-{size}", "/v1/embeddings", body, check=check)


def _rerank(rng: random.Random) -> Request:
    path = rng.choice(["/v1/rerank", "/v2/rerank", "/rerank"])
    docs = [text(rng, 5, 80) for _ in range(rng.choice([3, 10, 20, 50]))]
    body: dict[str, Any] = {"query": text(rng, 2, 10), "documents": docs}
    top_n = rng.choice([None, 0, 3, len(docs)])
    if top_n is not None:
        body["top_n"] = top_n
    wanted = top_n if top_n else len(docs)

    def check(reply: httpx.Response) -> bool:
        results = reply.json()["results"]
        scores = [r["relevance_score"] for r in results]
        return len(results) == wanted and scores == sorted(scores, reverse=True)

    return Request(f"rerank-{len(docs)}", path, body, check=check)


def pick(rng: random.Random, apis: list[str]) -> Request:
    request = _embeddings(rng) if rng.choice(apis) == "embeddings" else _rerank(rng)
    if request.expect == 200 and rng.random() < 0.02:
        request.kind, request.timeout = "gave-up", 0.005  # the client leaves at once
    return request


@dataclass
class Tally:
    started: float = field(default_factory=time.monotonic)
    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    sent: int = 0

    def record(self, request: Request, status: str, seconds: float, ok: bool) -> None:
        group = request.kind if request.kind == "gave-up" else request.kind.split("-")[0]
        self.statuses[(group, status)] += 1
        if not ok:
            self.unexpected[f"{request.kind} {request.path} -> {status}"] += 1
        elif status == "200":
            self.latencies.append(seconds)

    def percentiles(self) -> str:
        if len(self.latencies) < 2:
            return "p50 - p99 -"
        cuts = statistics.quantiles(self.latencies, n=100)
        return f"p50 {cuts[49] * 1000:.0f}ms p99 {cuts[98] * 1000:.0f}ms"


# The processes whose memory the soak watches, by their series on /metrics.
PROCESSES = {
    "API": "process_resident_memory_bytes",
    "engine": "fos_engine_process_resident_memory_bytes",
    "tokenizers": "fos_tokenizer_processes_resident_memory_bytes",  # 0 without them
}


async def rss(client: httpx.AsyncClient) -> dict[str, float]:
    """Resident memory in MiB of each of PROCESSES that /metrics shows."""
    reply = await client.get("/metrics")
    values = dict(line.split(" ", 1) for line in reply.text.splitlines() if " " in line)
    return {
        process: round(float(values[series]) / 2**20, 1)
        for process, series in PROCESSES.items()
        if series in values
    }


def show(memory: dict[str, float] | None) -> str:
    if not memory:
        return "-"
    return ", ".join(f"{process} {mib}" for process, mib in memory.items())


async def worker(
    client: httpx.AsyncClient,
    rng: random.Random,
    apis: list[str],
    tally: Tally,
    deadline: float,
    max_requests: int,
) -> None:
    while time.monotonic() < deadline and tally.sent < max_requests:
        tally.sent += 1
        request = pick(rng, apis)
        started = time.monotonic()
        try:
            reply = await client.post(request.path, json=request.body, timeout=request.timeout)
        except httpx.TimeoutException:
            tally.record(request, "timeout", 0, ok=request.kind == "gave-up")
            continue
        except httpx.TransportError as exc:
            tally.record(request, type(exc).__name__, 0, ok=False)
            continue
        seconds = time.monotonic() - started
        status = str(reply.status_code)
        if reply.status_code == 429:  # backpressure is a correct answer: honour it
            tally.record(request, status, seconds, ok=True)
            await asyncio.sleep(float(reply.headers.get("retry-after", "1")))
            continue
        wanted = 200 if request.kind == "gave-up" else request.expect
        ok = reply.status_code == wanted and (wanted != 200 or request.check(reply))
        tally.record(request, status, seconds, ok)


async def soak(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, limits=limits, timeout=60
    ) as client:
        info = (await client.get("/info")).json()
        apis = {"embeddings": ["embeddings"], "reranker": ["rerank"]}.get(
            info["service_type"], ["embeddings", "rerank"]
        )
        tally = Tally()
        start_rss = await rss(client)
        deadline = tally.started + args.seconds
        warm_at = tally.started + args.seconds * WARMUP_SHARE
        warm_rss: dict[str, float] | None = None
        rng = random.Random(args.seed)
        workers = [
            asyncio.create_task(
                worker(
                    client,
                    random.Random(rng.random()),
                    apis,
                    tally,
                    deadline,
                    args.max_requests,
                )
            )
            for _ in range(args.concurrency)
        ]
        print(
            f"soak: {args.url} ({info['service_type']}), {args.seconds:.0f}s, "
            f"{args.concurrency} clients, RSS MiB: {show(start_rss)}",
            flush=True,
        )
        next_report = tally.started + args.report_every
        while not all(task.done() for task in workers):
            await asyncio.sleep(0.2)
            now = time.monotonic()
            if warm_rss is None and now >= warm_at:
                warm_rss = await rss(client)
            if now >= next_report:
                next_report += args.report_every
                print(
                    f"  {now - tally.started:6.0f}s  {tally.sent} requests, "
                    f"{sum(tally.unexpected.values())} unexpected, {tally.percentiles()}, "
                    f"RSS MiB: {show(await rss(client))}",
                    flush=True,
                )
        for task in workers:
            task.result()
        end_rss = await rss(client)

    print("summary:")
    for (kind, status), count in sorted(tally.statuses.items()):
        print(f"  {kind:12s} {status:>9s}  {count}")
    print(f"  latency of 200s: {tally.percentiles()}")
    for what, count in tally.unexpected.most_common():
        print(f"  UNEXPECTED {count} x {what}")
    growth = {}
    for process in PROCESSES:
        if warm_rss and process in warm_rss and process in end_rss:
            growth[process] = round(end_rss[process] - warm_rss[process], 1)
    print(
        f"  RSS MiB: start {show(start_rss)}; after warm-up {show(warm_rss)}; "
        f"end {show(end_rss)}; growth after warm-up {show(growth)}"
    )
    grew = [process for process, mib in growth.items() if mib > args.max_rss_growth_mb]
    for process in grew:
        print(f"  GREW the {process} process: {growth[process]} MiB after warm-up")
    failed = bool(tally.unexpected) or bool(grew)
    print("verdict:", "FAIL" if failed else "ok")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--report-every", type=float, default=30)
    parser.add_argument("--max-rss-growth-mb", type=float, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    host = urlsplit(args.url).hostname or ""
    if host not in LOOPBACK:
        parser.error(f"--url must be on the loopback interface (127.0.0.1, ::1, localhost): {host}")
    if not 0 < args.seconds <= 7 * 24 * 3600 or not 1 <= args.concurrency <= 256:
        parser.error("--seconds must be in (0, 1 week] and --concurrency in [1, 256]")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
