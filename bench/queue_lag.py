"""Does the server stay responsive with 100,000 items queued? (issue 10, item 4)

Starts the real server (a stand-in model, ``MAX_QUEUE_TOKENS`` raised so that
nothing is refused), then queues ~100,000 short items at once (by default 50
requests of 2,000 one-word texts, from 50 connections) and, while the engine
works through them:

- probes ``GET /health`` every 10 ms, open loop (a probe is due every 10 ms whatever
  earlier ones still wait for, sent over 4 connections, and its latency counts from
  its due time): the latency of a request that does no work is the time the event
  loop was busy elsewhere (an orchestrator's liveness probe sees exactly this);
- polls ``/metrics`` for the queue depth (``fos_queue_tokens``) and for an
  event-loop lag metric if the server has one (``--lag-metric``, default
  ``fos_event_loop_lag_seconds``; a gauge, a summary or a histogram);
- samples the resident memory of the server's whole process tree.

It reports /health latency (p50 / p99 / max) idle before, during the overload (in
two phases: the intake, while the requests are read, parsed, tokenized and queued,
up to the queue's peak; and the drain, while batches are taken from the full queue)
and idle after, the queue's peak, how long the queue took to drain, and the RSS
before, at its peak and after the queue drained. Run from the repository root::

    uv run python -m bench.queue_lag                      # tiny stand-in on CPU, ~2 minutes
    uv run python -m bench.queue_lag --server-src /tmp/base --tag before

Results go to ``bench/results/queue-lag-<shape>-<device>[-<tag>].md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from bench.client import Connection, encode_request, loop_name, run_async
from bench.measure import Meter, machine_info, rss_mib
from bench.server import Server, parse_with_server_options, serve, source_info, tell_server_logs
from bench.workload import EMBED_MODEL
from tests.support import standins

LAG_METRIC = "fos_event_loop_lag_seconds"
PROBE_CONNECTIONS = 4
QUEUE_METRIC = "fos_queue_tokens"
WORDS = (  # noqa: SIM905 - one-word texts, as bench/soak.py uses
    "東京 大阪 京都 瑠璃色 深い 青 空 海 山 川 日本 首都 経済 歴史 文化 技術 研究 "
    "検索 文書 質問 回答 モデル 言語 埋め込み 再ランク 速度 品質 会議 予定 報告"
).split()


def _log(message: str) -> None:
    print(f"[queue-lag {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _latencies(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"probes": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ms = sorted(1000 * v for v in values)
    return {
        "probes": len(ms),
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
        "max_ms": ms[-1],
    }


# --- /metrics ----------------------------------------------------------------------
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)")


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Every sample of metric family ``name`` (gauge, counter, summary or histogram
    lines: name, name_sum, name_count, name_bucket, name_max...) as {line key: value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"].startswith(name):
            suffix = match["name"][len(name) :]
            if suffix in ("", "_sum", "_count", "_bucket", "_max", "_total", "_created"):
                key = match["name"] + ("{" + match["labels"] + "}" if match["labels"] else "")
                out[key] = float(match["value"])
    return out


def summarize_lag(name: str, first: dict[str, float], polls: list[dict[str, float]]) -> Any:
    """What the server's own event-loop lag metric says over the overload; None if absent."""
    if not polls or not any(polls):
        return None
    last = polls[-1]
    summary: dict[str, Any] = {"metric": name}
    gauges = [v for poll in polls for k, v in poll.items() if k == name or k.startswith(name + "{")]
    if gauges:
        summary["gauge_max_s"] = max(gauges)
        summary["gauge_mean_s"] = statistics.fmean(gauges)
    maxima = [v for poll in polls for k, v in poll.items() if k.startswith(name + "_max")]
    if maxima:
        summary["max_s"] = max(maxima)
    count = sum(v for k, v in last.items() if k.startswith(name + "_count")) - sum(
        v for k, v in first.items() if k.startswith(name + "_count")
    )
    total = sum(v for k, v in last.items() if k.startswith(name + "_sum")) - sum(
        v for k, v in first.items() if k.startswith(name + "_sum")
    )
    if count > 0:
        summary["observations"] = count
        summary["mean_s"] = total / count
    buckets: dict[float, float] = {}
    for key, value in last.items():
        le = re.search(r'le="([^"]+)"', key)
        if key.startswith(name + "_bucket") and le:
            bound = float(le[1])
            buckets[bound] = buckets.get(bound, 0.0) + value - first.get(key, 0.0)
    if buckets and count > 0:
        ordered = sorted(buckets.items())
        summary["p99_at_most_s"] = next(b for b, c in ordered if c >= 0.99 * count)
        summary["max_at_most_s"] = next(b for b, c in ordered if c >= count)
    return summary


# --- the run ---------------------------------------------------------------------------
class RssSampler:
    """The server tree's resident memory every 0.1 s, in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append((time.monotonic(), rss_mib(self.pid)))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def _idle_probes(server: Server, n: int) -> list[float]:
    connection = Connection(server.base_url)
    request = encode_request(server.base_url, "GET", "/health")
    times = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            status, _ = await connection.request(request)
            times.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"/health answered {status}")
            await asyncio.sleep(0.005)
    finally:
        await connection.close()
    return times


async def overload(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    bodies = [
        encode_request(
            server.base_url,
            "POST",
            "/v1/embeddings",
            orjson.dumps(
                {
                    "model": EMBED_MODEL,
                    "input": [rng.choice(WORDS) for _ in range(args.texts)],
                    "encoding_format": "base64",
                }
            ),
        )
        for _ in range(args.requests)
    ]
    health = encode_request(server.base_url, "GET", "/health")
    metrics = encode_request(server.base_url, "GET", "/metrics")
    probes: list[tuple[float, float]] = []  # (sent, latency), monotonic
    polls: list[tuple[float, float, dict[str, float]]] = []  # (at, queue tokens, lag samples)
    done = asyncio.Event()

    async def read_metrics(connection: Connection) -> tuple[float, dict[str, float]]:
        status, body = await connection.request(metrics)
        text = body.decode() if status == 200 else ""
        queue = sum(metric_samples(text, QUEUE_METRIC).values())
        return queue, metric_samples(text, args.lag_metric)

    due_times: asyncio.Queue[float | None] = asyncio.Queue()

    async def prober() -> None:
        # Open loop: a probe is due every interval whatever the others wait for, and its
        # latency counts from its due time (a stalled server cannot hide behind one slow
        # probe); a few connections send them, so a stall does not open hundreds more.
        connection = Connection(server.base_url)
        await connection.connect()
        try:
            while (due := await due_times.get()) is not None:
                status, _ = await connection.request(health)
                probes.append((due, time.monotonic() - due))
                if status != 200:
                    raise RuntimeError(f"/health answered {status} under load")
        finally:
            await connection.close()

    async def probes_every_interval() -> None:
        interval = args.probe_interval_ms / 1000
        senders = [asyncio.create_task(prober()) for _ in range(PROBE_CONNECTIONS)]
        due = time.monotonic()
        while not done.is_set():
            due_times.put_nowait(due)
            due += interval
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        for _ in senders:
            due_times.put_nowait(None)
        await asyncio.gather(*senders)

    async def poll() -> None:
        connection = Connection(server.base_url)
        try:
            while not done.is_set():
                queue, lag = await read_metrics(connection)
                polls.append((time.monotonic(), queue, lag))
                await asyncio.sleep(0.5)
        finally:
            await connection.close()

    finished: list[float] = []
    statuses: list[int] = []

    async def send(raw: bytes, connection: Connection) -> None:
        status, _ = await connection.request(raw)
        statuses.append(status)
        finished.append(time.monotonic())

    connections = [Connection(server.base_url) for _ in bodies]
    await asyncio.gather(*(c.connect() for c in connections))
    first_connection = Connection(server.base_url)
    _, lag_before = await read_metrics(first_connection)
    await first_connection.close()
    background = [asyncio.create_task(probes_every_interval()), asyncio.create_task(poll())]
    await asyncio.sleep(0.5)  # a few probes before the flood
    started = time.monotonic()
    drained = True
    try:
        await asyncio.wait_for(
            asyncio.gather(*(send(raw, c) for raw, c in zip(bodies, connections, strict=True))),
            timeout=args.max_seconds,
        )
    except TimeoutError:
        drained = False
    ended = time.monotonic()
    await asyncio.sleep(0.5)
    done.set()
    await asyncio.gather(*background)
    await asyncio.gather(*(c.close() for c in connections))

    def between(start: float, end: float) -> list[float]:
        return [latency for due, latency in probes if start <= due <= end]

    queued = [(at, q) for at, q, _ in polls if started <= at <= ended]
    peak_at = max(queued, key=lambda item: item[1])[0] if queued else ended
    per_second: dict[int, dict[str, float]] = {}
    for sent, latency in probes:
        second = int(sent - started)
        slot = per_second.setdefault(second, {"health_max_ms": 0.0, "probes": 0})
        slot["health_max_ms"] = max(slot["health_max_ms"], 1000 * latency)
        slot["probes"] += 1
    for at, q in queued:
        per_second.setdefault(int(at - started), {"health_max_ms": 0.0, "probes": 0})[
            "queue_tokens"
        ] = q
    return {
        "requests": len(bodies),
        "texts_per_request": args.texts,
        "items": len(bodies) * args.texts,
        "answered": len(statuses),
        "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "drained": drained,
        "overload_s": ended - started,
        "items_per_s": len(statuses) * args.texts / (ended - started),
        "health_during_overload": _latencies(between(started, ended)),
        "health_intake": _latencies(between(started, peak_at)),
        "health_drain": _latencies(between(peak_at, ended)),
        "queue_peak_after_s": peak_at - started,
        "queue_tokens_peak": max((q for _, q in queued), default=None),
        "queue_polls": len(queued),
        "event_loop_lag": summarize_lag(args.lag_metric, lag_before, [lag for *_, lag in polls]),
        "timeline": [{"second": k, **v} for k, v in sorted(per_second.items()) if k >= -1],
        "window": (started, ended),
    }


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    command = " ".join(
        ["uv run python -m bench.queue_lag", shlex.join(argv if argv is not None else sys.argv[1:])]
    ).strip()
    settings = {"MAX_QUEUE_TOKENS": str(args.max_queue_tokens), **args.server_env}
    results: dict[str, Any] = {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "shape": args.shape,
        "device": device,
        "machine": machine_info(device),
        "server_source": source_info(args.server_src),
        "server_settings": settings,
        "client_loop": loop_name(),
        "load_before": list(os.getloadavg()),
    }
    temporary = args.hf_home is None
    hf_home = args.hf_home or Path(tempfile.mkdtemp(prefix="queue-lag-hf-"))
    log_dir = Path(tempfile.mkdtemp(prefix="queue-lag-logs-"))
    try:
        if not args.reuse:
            _log(f"building the {args.shape} embeddings stand-in under {hf_home}")
            snapshot = standins.build_ruri_large(hf_home, args.shape)
        else:
            repo = hf_home / "hub" / ("models--" + EMBED_MODEL.replace("/", "--"))
            snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(snapshot))
        results["tokens_per_text"] = statistics.fmean(
            len(ids) for ids in tokenizer(WORDS)["input_ids"]
        )
        with serve(hf_home, "embeddings", device, log_dir, settings, args.server_src) as server:
            _log(f"server ready in {server.startup_s:.1f}s; warming up with one request")
            results["startup_s"] = server.startup_s
            run_async(_warm(server, args.texts))
            time.sleep(2)
            results["rss_before_mib"] = rss_mib(server.pid)
            results["health_idle_before"] = _latencies(run_async(_idle_probes(server, 200)))
            _log(
                f"RSS {results['rss_before_mib']:.0f} MiB; /health idle p50 "
                f"{results['health_idle_before']['p50_ms']:.2f} ms; queueing "
                f"{args.requests} x {args.texts} texts"
            )
            with RssSampler(server.pid) as rss:
                meter = Meter(server.pid)
                results["overload"] = run_async(overload(server, args))
                meters = meter.stop()
                results["overload"].update(
                    other_load_cores=meters["other_load_cores"],
                    server_cpu_cores=meters["server_cpu_cores"],
                    client_cpu_s=meters["client_cpu_s"],
                )
                started, ended = results["overload"].pop("window")
                time.sleep(2)
            peak = [mib for at, mib in rss.samples if started <= at <= ended + 0.5]
            results["rss_peak_mib"] = max(peak, default=float("nan"))
            results["rss_after_mib"] = rss_mib(server.pid)
            results["health_idle_after"] = _latencies(run_async(_idle_probes(server, 200)))
    except BaseException:
        tell_server_logs(log_dir, _log)
        raise
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
        if temporary:
            shutil.rmtree(hf_home, ignore_errors=True)
    results["load_after"] = list(os.getloadavg())
    return results


async def _warm(server: Server, texts: int) -> None:
    connection = Connection(server.base_url)
    body = {"model": EMBED_MODEL, "input": WORDS * (texts // len(WORDS) + 1)}
    body["input"] = body["input"][:texts]
    status, reply = await connection.request(
        encode_request(server.base_url, "POST", "/v1/embeddings", orjson.dumps(body))
    )
    await connection.close()
    if status != 200:
        raise RuntimeError(f"warm-up request: {status} {reply[:300]!r}")


# --- report ----------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def render(r: dict[str, Any]) -> str:
    o = r["overload"]
    m = r["machine"]
    src = r["server_source"]
    where = "this tree" if src.get("this_tree") else f"`{src['path']}` (`--server-src`)"
    if src.get("commit"):
        where += f", commit {src['commit'][:12]}" + (
            f" ({src['subject']})" if src.get("subject") else ""
        )
    peak = o["queue_tokens_peak"]
    peak_items = (
        f"{peak:,.0f} tokens (≈ {peak / r['tokens_per_text']:,.0f} items)"
        if peak is not None
        else "– (no fos_queue_tokens on /metrics)"
    )
    rows = [
        ("idle, before", r["health_idle_before"]),
        ("the whole overload (first request sent to last answered)", o["health_during_overload"]),
        (
            "intake: requests read, parsed, tokenized and queued (the first "
            f"{o['queue_peak_after_s']:.1f} s, until the queue's peak)",
            o["health_intake"],
        ),
        (
            "drain: batches taken from the full queue (queue peak to last answered)",
            o["health_drain"],
        ),
        ("idle, after the queue drained", r["health_idle_after"]),
    ]
    out = [
        f"# Queue lag: {o['items']:,} short items queued at once ({r['shape']} stand-in, "
        f"{r['device']})",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}",
        "",
        f"- Machine: {m['cpu']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; {m['cores']} cores; Python {m['python']}, torch {m['torch']}",
        f"- Server: {where}; settings: "
        + ", ".join(f"{k}={v}" for k, v in r["server_settings"].items())
        + "; the rest defaults",
        f"- Load: {o['requests']} requests of {o['texts_per_request']:,} one-word texts "
        f"(≈ {r['tokens_per_text']:.1f} tokens each), sent at once from {o['requests']} "
        f"connections; GET /health due every {r['probe_interval_ms']:g} ms, open loop "
        f"(latency from each probe's due time, sent over {PROBE_CONNECTIONS} connections); "
        f"client on {r['client_loop']}",
        f"- Other processes used {o.get('other_load_cores', float('nan')):.2f} cores during the "
        f"overload (the server's tree: {o.get('server_cpu_cores', float('nan')):.2f}, this "
        f"client: {o.get('client_cpu_s', 0) / o['overload_s']:.2f})",
        "- Load average (1/5/15 min) before: "
        + " / ".join(f"{x:.2f}" for x in r["load_before"])
        + "; after: "
        + " / ".join(f"{x:.2f}" for x in r["load_after"]),
        "",
        "## GET /health latency",
        "",
        "| when | probes | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {label} | {s['probes']} | {_ms(s['p50_ms'])} | {_ms(s['p99_ms'])} | "
            f"{_ms(s['max_ms'])} |"
            for label, s in rows
        ),
        "",
        "## The overload",
        "",
        f"- Answered: {o['answered']} of {o['requests']} requests, statuses "
        + ", ".join(f"{k}: {v}" for k, v in o["statuses"].items())
        + ("" if o["drained"] else f"; **not drained within {r['max_seconds']} s**"),
        f"- Time from the first request sent to the last answered: {o['overload_s']:.1f} s "
        f"({o['items_per_s']:,.0f} items/s)",
        f"- Queue peak (fos_queue_tokens, polled every 0.5 s): {peak_items}",
        f"- Server RSS (its whole process tree, VmRSS): before {r['rss_before_mib']:,.0f} MiB, "
        f"peak {r['rss_peak_mib']:,.0f} MiB, 2 s after the queue drained "
        f"{r['rss_after_mib']:,.0f} MiB",
    ]
    lag = o["event_loop_lag"]
    if lag is None:
        out.append(f"- Event-loop lag metric: `{r['lag_metric']}` is not on /metrics")
    else:
        parts = [
            f"{k.replace('_s', '')} {1000 * v:,.1f} ms" for k, v in lag.items() if k.endswith("_s")
        ]
        if "observations" in lag:
            parts.append(f"{lag['observations']:.0f} observations")
        out.append(
            f"- Event-loop lag metric `{lag['metric']}` over the overload: " + ", ".join(parts)
        )
    out += [
        "",
        "Per second of the overload (max /health latency, queue tokens at the last poll):",
        "",
        "| second | /health max ms | probes | queue tokens |",
        "|---:|---:|---:|---:|",
        *(
            f"| {t['second']} | {t['health_max_ms']:,.1f} | {t['probes']} | "
            f"{t['queue_tokens']:,.0f} |"
            if "queue_tokens" in t
            else f"| {t['second']} | {t['health_max_ms']:,.1f} | {t['probes']} | – |"
            for t in o["timeline"][:: max(1, len(o["timeline"]) // 40)]
        ),
        "",
    ]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.queue_lag", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--shape", choices=sorted(standins.BERT_SHAPES), default="tiny")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--texts", type=int, default=2000, help="one-word texts per request")
    parser.add_argument("--probe-interval-ms", type=float, default=10.0)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="give up after this")
    parser.add_argument("--max-queue-tokens", type=int, default=20_000_000)
    parser.add_argument(
        "--lag-metric",
        default=LAG_METRIC,
        help=f"the server's event-loop lag metric on /metrics (default {LAG_METRIC})",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parse_with_server_options(parser, argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = run(args, argv)
    results.update(
        probe_interval_ms=args.probe_interval_ms,
        max_seconds=args.max_seconds,
        lag_metric=args.lag_metric,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "-".join(filter(None, ["queue-lag", args.shape, results["device"], args.tag]))
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    stem.with_suffix(".md").write_text(render(results))
    o = results["overload"]["health_during_overload"]
    _log(
        f"/health during the overload: p50 {_ms(o['p50_ms'])} ms, p99 {_ms(o['p99_ms'])} ms, "
        f"max {_ms(o['max_ms'])} ms; wrote {stem}.md"
    )
    return results


if __name__ == "__main__":
    main()
