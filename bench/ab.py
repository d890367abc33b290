"""Two servers side by side, the same embeddings scenarios on each in turn: A/B on one machine.

Two ``bench.run`` runs minutes apart compare two states of the machine as much as two
trees (a shared host's other tenants, clocks, caches). Here both servers run at once (A
from ``--server-src``, B from this tree, same settings and stand-ins) and the scenarios
go to one, then the other, round after round, the first of each pair swapped every
round, so that a slow spell of the machine falls on both. Each round gives B's figure
over A's; the report lists every round and their median. From the repository root::

    uv run python -m bench.ab --server-src /tmp/base --shape null --scenarios 2
    python3 -m bench.ab --server-src .gpu/base --shape full --device cuda --rounds 3

(the second on the lent GPU machine, see ``bench/gpu.sh``). Without a GPU,
``--emulate-gpu`` runs both trees over fake models that take the lent H200's time
(``EMULATED_H200``): how the server's pipeline keeps a GPU fed, measured on any machine::

    uv run python -m bench.ab --server-src /tmp/base --emulate-gpu --scenarios 1 2 3

Results go to ``<out>/ab-<shape>-<device>[-<tag>].md`` and ``.json`` (device
``emulated-gpu`` for the latter). No in-process ceilings: that is ``bench.run``'s job;
this one answers only "which tree is faster here, now".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bench.client import close_all, open_connections, run_async, run_users
from bench.measure import Meter, machine_info, sample_gpu
from bench.server import (
    Server,
    _engine,
    _engine_delta,
    _latencies,
    _post,
    _vectors,
    embed_clients,
    embeddings_scenarios,
    env_pairs,
    min_cosine,
    parse_with_server_options,
    serve,
    source_info,
    tell_server_logs,
)
from bench.workload import (
    EMBED_MODEL,
    EMULATED_H200,
    PLANS,
    Plan,
    embedding_texts,
    plan_for,
)
from tests.support import standins

TREES = ("A", "B")
# What each row reports, from bench.server.measured's results or _pooled's (None where
# absent).
COLUMNS = (
    ("per_s", "texts/s", "{:,.1f}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("mean_batch_size", "mean batch", "{:.1f}"),
    ("model_busy_fraction", "model busy", "{:.0%}"),
    ("starved_fraction", "engine empty", "{:.0%}"),
    ("queue_wait_ms", "queue wait ms", "{:.1f}"),
    ("gpu_busy", "GPU busy", "{:.0%}"),
    ("graph_fraction", "on CUDA graphs", "{:.0%}"),
    ("api_cpu_cores", "API CPU", "{:.2f}"),
    ("busiest_child_cpu_cores", "engine CPU", "{:.2f}"),
    ("client_us_per_request", "client µs/request", "{:.0f}"),
)


def _log(message: str) -> None:
    print(f"[ab {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--shape", choices=sorted(PLANS), default="null")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["2"],
        choices=["1", "2", "3", "5"],
        help="embeddings scenarios as in bench.run (2 runs 2, 2-256 and 2u); 5: 16 chat "
        "users, one text per request, while a bulk job sends scenario 3's requests (its "
        "p50/p99 are the chat users'); GET /health runs too, where B is one server",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--b-replicas",
        type=int,
        default=1,
        metavar="N",
        help="B is N servers of this tree, each one-text scenario's clients spread evenly "
        "over them (as a least-connections balancer settles); scenario 2 only",
    )
    parser.add_argument(
        "--emulate-gpu",
        action="store_true",
        help="both trees over the fake models with the lent H200's timing (EMULATED_H200 in "
        "bench/workload.py: tokenizing and forward passes sleep as long as they took there): "
        "the server's hand-offs at a GPU host's pace, on this machine; no stand-ins",
    )
    parser.add_argument(
        "--b-env",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="settings for B only, over --server-env's: the A/B of a setting (without "
        "--server-src, A is this tree too)",
    )
    args = parse_with_server_options(parser, argv)
    args.b_env = env_pairs(parser, "--b-env", args.b_env)
    if args.server_src is None and args.b_replicas == 1 and not args.b_env:
        parser.error(
            "--server-src is tree A (this tree is B), unless --b-replicas is over 1 or "
            "--b-env sets B apart"
        )
    if args.b_replicas > 1 and set(args.scenarios) != {"2"}:
        parser.error("--b-replicas spreads many clients: use it with --scenarios 2")
    if args.emulate_gpu and args.device != "cpu":
        parser.error("--emulate-gpu stands in for a GPU: leave --device as cpu")
    if args.rounds < 1 or args.b_replicas < 1:
        parser.error("--rounds and --b-replicas must be at least 1")
    return args


def _names(replicas: int) -> list[str]:
    return ["A", "B"] if replicas == 1 else ["A", *(f"B{i}" for i in range(1, replicas + 1))]


@contextlib.contextmanager
def _servers(args: argparse.Namespace, hf_home: Path, log_dir: Path) -> Any:
    """Server A and B's server(s), started at the same time (start-up warms and captures
    for a minute on a GPU); all stopped on the way out, also when one fails to start."""
    managers = {}
    settings, fakes = args.server_env, None
    if args.emulate_gpu:
        settings = {**EMULATED_H200.settings(), **args.server_env}
        fakes = EMULATED_H200.fakes()
    for name in _names(args.b_replicas):
        (log_dir / name).mkdir()
        source = args.server_src if name == "A" else None
        own = settings if name == "A" else {**settings, **args.b_env}
        managers[name] = serve(
            hf_home, "embeddings", args.device, log_dir / name, own, source, fakes=fakes
        )
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(len(managers)) as pool:
            starting = {name: pool.submit(m.__enter__) for name, m in managers.items()}
        servers: dict[str, Server] = {}
        failure: BaseException | None = None
        for name, future in starting.items():
            try:
                servers[name] = future.result()
                stack.push(managers[name].__exit__)
            except BaseException as error:  # the others still stop
                failure = failure or error
        if failure is not None:
            raise failure
        yield servers


async def _spread(
    servers: list[Server], plan: Plan, texts: dict[str, list[str]]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The one-text scenarios with each one's clients spread evenly over ``servers``
    (every connection pinned to one server), measured as one: texts/s and latency of
    the whole, CPU summed over the servers, batches pooled."""
    results: dict[str, Any] = {}
    outputs: dict[str, np.ndarray] = {}
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=s.base_url, timeout=600))
            for s in servers
        ]
        for client in clients:  # untimed: touch the route once
            warm = await client.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "準備"})
            warm.raise_for_status()
        for key, items in texts.items():
            body = [{"model": EMBED_MODEL, "input": [text]} for text in items]
            requests = [_post(servers[0], "/v1/embeddings", b) for b in body]
            users = embed_clients(plan, key)
            connections = []
            for i, server in enumerate(servers):
                share = users // len(servers) + (i < users % len(servers))
                connections += await open_connections(server.base_url, share)
            before = [await _engine(c, EMBED_MODEL) for c in clients]
            meters = [Meter(s.pid) for s in servers]
            try:
                bodies, times = await run_users(connections, requests)
            finally:
                await close_all(connections)
            used = [m.stop() for m in meters]
            after = [await _engine(c, EMBED_MODEL) for c in clients]
            results[key] = _pooled(used, before, after, len(requests), times)
            outputs[key] = np.concatenate([_vectors(orjson.loads(b), 1) for b in bodies])
    return results, outputs


def _pooled(
    used: list[dict[str, Any]],
    before: list[dict[str, Any] | None],
    after: list[dict[str, Any] | None],
    requests: int,
    times: list[float],
) -> dict[str, Any]:
    wall = max(u["wall_s"] for u in used)
    deltas = [_engine_delta(b, a, u["wall_s"]) for b, a, u in zip(before, after, used, strict=True)]
    batches = sum(d["forward_batches"] or 0 for d in deltas)
    items = sum((d["mean_batch_size"] or 0) * (d["forward_batches"] or 0) for d in deltas)
    graphs = [(d["graph_fraction"], d["forward_batches"] or 0) for d in deltas]
    return {
        "requests": requests,
        "texts": requests,
        "wall_s": wall,
        "per_s": requests / wall,
        **_latencies(times),
        "mean_batch_size": items / batches if batches else None,
        "model_busy_fraction": statistics.fmean(d["model_busy_fraction"] or 0 for d in deltas),
        "starved_fraction": None
        if any(d["starved_fraction"] is None for d in deltas)
        else statistics.fmean(d["starved_fraction"] for d in deltas),
        "queue_wait_ms": None
        if any(d["queue_wait_ms"] is None for d in deltas)
        else statistics.fmean(d["queue_wait_ms"] for d in deltas),
        "graph_fraction": None
        if any(g is None for g, _ in graphs) or not batches
        else sum(g * n for g, n in graphs) / batches,
        "gpu_busy": used[0].get("gpu_busy"),
        "api_cpu_cores": sum(u["api_cpu_cores"] for u in used),
        "busiest_child_cpu_cores": sum(u["busiest_child_cpu_cores"] for u in used),
        "client_us_per_request": 1e6 * used[0]["client_cpu_s"] / requests,
    }


def _row(result: dict[str, Any]) -> list[str]:
    cells = []
    for key, _, form in COLUMNS:
        value = result.get(key)
        cells.append("–" if value is None else form.format(value))
    return cells


def measure(
    args: argparse.Namespace, hf_home: Path, save: Callable[[dict[str, Any]], None]
) -> None:
    """The rounds; ``save`` gets the results so far after each (a run cut short by a
    time limit still leaves its finished rounds)."""
    plan = plan_for(args.shape, args.device)
    texts = embedding_texts(plan, set(args.scenarios))
    log_dir = Path(tempfile.mkdtemp(prefix="bench-ab-logs-"))
    rounds: list[dict[str, Any]] = []
    try:
        with sample_gpu(args.device), _servers(args, hf_home, log_dir) as servers:
            _log("ready: " + ", ".join(f"{n} in {s.startup_s:.1f} s" for n, s in servers.items()))
            for number in range(args.rounds):
                order = TREES if number % 2 == 0 else TREES[::-1]
                done: dict[str, Any] = {"order": "".join(order)}
                vectors: dict[str, dict[str, np.ndarray]] = {}
                for name in order:
                    if name == "B" and args.b_replicas > 1:
                        replicas = [s for n, s in servers.items() if n != "A"]
                        done[name], vectors[name] = run_async(_spread(replicas, plan, texts))
                    else:
                        done[name], vectors[name] = run_async(
                            embeddings_scenarios(servers[name], plan, texts)
                        )
                done["min_cosine_b_to_a"] = min(
                    (min_cosine(vectors["B"][k], vectors["A"][k]) for k in vectors["B"]),
                    default=None,
                )
                rounds.append(done)
                save(_summary(plan, rounds))
                _log(
                    f"round {number + 1} ({done['order']}): "
                    + "; ".join(
                        f"{key} B/A {done['B'][key]['per_s'] / done['A'][key]['per_s']:.2f}"
                        for key in done["B"]
                    )
                )
    except BaseException:
        tell_server_logs(log_dir, _log)
        raise
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def _summary(plan: Plan, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = list(rounds[0]["B"])  # with replicas, B skips GET /health
    return {
        "plan": asdict(plan),
        "rounds": rounds,
        "b_over_a": {
            key: [r["B"][key]["per_s"] / r["A"][key]["per_s"] for r in rounds] for key in keys
        },
    }


def _machine(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (
        f"{m['cpu']}{gpu}; {m['cores']} cores; Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}"
    )


def render(results: dict[str, Any]) -> str:
    source = results["source_a"]
    replicas = results.get("b_replicas", 1)
    b = "this tree" if replicas == 1 else f"{replicas} servers of this tree, each scenario's "
    b += "" if replicas == 1 else "clients spread evenly over them"
    emulated = results.get("emulated_gpu")
    where = "an emulated GPU" if emulated else results["device"]
    lines = [
        f"# A/B: {results['shape']} shape on {where}, all servers at once",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}",
        "",
        f"- Machine: {_machine(results['machine'])}",
        f"- A: the tree at {source['path']} (commit {source.get('commit', '?')}); "
        f"B: {b} (commit {results['source_b'].get('commit', '?')})",
        f"- Settings (all): {results['server_settings'] or 'defaults'}",
    ]
    if results.get("b_settings"):
        lines.append(f"- B's own settings, over those: {results['b_settings']}")
    if emulated:
        lines.append(
            "- Emulated GPU (`EMULATED_H200`, bench/workload.py): the fake models, each "
            f"forward pass {emulated['pass_ms']} ms + {emulated['token_ms'] * 1000:.3g} µs "
            "per token of its padded shape (the CUDA backend's shapes), one after another; "
            f"tokenizing {emulated['tokenize_ms_per_text']} ms per text in each tokenizer "
            f"process; one token per character up to {emulated['max_length']}; vectors of "
            f"{emulated.get('dimension', 8)} dimensions; settings "
            f"{emulated['settings']} (unless set above); the model alone, batches of 128: "
            f"{emulated['device_alone']:,.0f} "
            "texts/s. Only the serving process uses this machine's CPU."
        )
    lines += [
        "- Every round runs the scenarios on A, then on B, or B then A (the order named per "
        "round); the idle servers' CPU counts as other load. GET /health (0) runs on a "
        "single server only; with several B servers their CPU is summed.",
        "",
        "B over A, texts/s (requests/s for 0), per round, and their median:",
        "",
        "| scenario | "
        + " | ".join(f"round {i + 1}" for i in range(len(results["rounds"])))
        + " | median |",
        "|---|" + "---:|" * (len(results["rounds"]) + 1),
    ]
    for key, ratios in results["b_over_a"].items():
        cells = [f"{r:.2f}" for r in ratios] + [f"**{statistics.median(ratios):.2f}**"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if emulated:
        lines += ["", "Median texts/s over the emulated model alone:", ""]
        lines += ["| scenario | A | B |", "|---|---:|---:|"]
        for key in (k for k in results["b_over_a"] if k != "0"):  # 0: GET /health
            medians = [
                statistics.median(r[name][key]["per_s"] for r in results["rounds"]) for name in "AB"
            ]
            lines.append(
                f"| {key} | "
                + " | ".join(f"{m / emulated['device_alone']:.2f}×" for m in medians)
                + " |"
            )
    if "5" in results["b_over_a"]:
        lines += [
            "",
            "Scenario 5, the chat users' one-text requests beside the bulk job: median over "
            "the rounds, A → B:",
            "",
            "| p50 ms | p90 ms | p99 ms | chat requests/s | bulk texts/s |",
            "|---:|---:|---:|---:|---:|",
        ]
        cells = []
        for key in ("p50_ms", "p90_ms", "p99_ms", "one_text_per_s", "bulk_texts_per_s"):
            a, b = (statistics.median(r[n]["5"][key] for r in results["rounds"]) for n in "AB")
            cells.append(f"{a:,.1f} → {b:,.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    cosines = [r["min_cosine_b_to_a"] for r in results["rounds"]]
    if any(c is not None for c in cosines):
        least = min(c for c in cosines if c is not None)
        lines += ["", f"Outputs: B's vectors against A's, least cosine {least:.5f}."]
    header = "| scenario | round | tree | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines += ["", header, "|---|---:|---|" + "---:|" * len(COLUMNS)]
    for key in results["b_over_a"]:
        for number, done in enumerate(results["rounds"], 1):
            for name in done["order"]:
                lines.append(
                    f"| {key} | {number} | {name} | " + " | ".join(_row(done[name][key])) + " |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    given = argv if argv is not None else sys.argv[1:]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": f"python -m bench.ab {shlex.join(given)}",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "shape": args.shape,
        "device": args.device,
        "machine": machine_info(args.device),
        "server_settings": args.server_env,
        "b_settings": args.b_env,
        "source_a": source_info(args.server_src),
        "source_b": source_info(None),
        "b_replicas": args.b_replicas,
        "emulated_gpu": {
            **asdict(EMULATED_H200),
            "settings": EMULATED_H200.settings(),
            "device_alone": EMULATED_H200.device_alone,
        }
        if args.emulate_gpu
        else None,
    }
    hf_home = args.hf_home or Path(tempfile.mkdtemp(prefix="bench-ab-hf-"))
    try:
        if not args.reuse and not args.emulate_gpu:
            _log(f"building {args.shape} stand-in under {hf_home}")
            standins.build_ruri_large(hf_home, args.shape)
        args.out.mkdir(parents=True, exist_ok=True)
        device = "emulated-gpu" if args.emulate_gpu else args.device
        stem = args.out / "-".join(filter(None, ["ab", args.shape, device, args.tag]))

        def save(rounds: dict[str, Any]) -> None:
            results.update(rounds, run_s=time.perf_counter() - started)
            stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
            stem.with_suffix(".md").write_text(render(results))

        measure(args, hf_home, save)
    finally:
        if args.hf_home is None:
            shutil.rmtree(hf_home, ignore_errors=True)
    _log(f"wrote {stem}.md in {results['run_s'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
