"""How much Python the API process runs per request: function calls, counted exactly.

On a noisy machine a change of 5% in the API process's time per request drowns in the
drift between runs (this 2-core machine slowed down ~1.8× for minutes at a time in
one session). The number of Python function calls per request barely moves: it is
nearly the same on any machine (two runs of one tree: 1,199 and 1,187; only batching,
which timing decides, changes a few calls), so it shows what a change to the HTTP path
did where a timing would not. It says nothing of the time spent inside C or Rust code
(the tokenizers, JSON, the socket), which it counts as one call each.

It runs the real server (the ``null`` stand-in by default, so that the model costs nothing)
under ``cProfile`` twice, once with N and once with 2N one-text requests of 300
characters from 64 connections, and takes the difference: start-up, shutdown and
warm-up cancel out. cProfile sees the API process's main thread (the event loop,
where the routes, the services and, on a CPU host, the tokenizer run). From the
repository root::

    uv run python -m bench.calls                           # ~1 minute on 2 CPU cores
    uv run python -m bench.calls --server-src /tmp/base --tag before

Results go to ``bench/results/calls-<tag>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pstats
import shlex
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from bench.client import close_all, encode_request, open_connections, run_async, run_users
from bench.measure import machine_info
from bench.server import parse_with_server_options, serve, source_info
from bench.workload import EMBED_MODEL, texts_300
from tests.support import standins

CLIENTS = 64


def _requests(base_url: str, n: int) -> list[bytes]:
    return [
        encode_request(
            base_url,
            "POST",
            "/v1/embeddings",
            orjson.dumps({"model": EMBED_MODEL, "input": text}),
        )
        for text in texts_300(n, seed=7)
    ]


async def _send(base_url: str, requests: list[bytes]) -> None:
    connections = await open_connections(base_url, CLIENTS)
    try:
        await run_users(connections, requests)
    finally:
        await close_all(connections)


def _profile(hf_home: Path, work: Path, n: int, args: argparse.Namespace) -> pstats.Stats:
    """The API process's profile over its whole life, having served ``n`` requests."""
    out = work / f"api-{n}.prof"
    with serve(
        hf_home,
        "embeddings",
        "cpu",
        work,
        args.server_env,
        args.server_src,
        python_args=["-m", "cProfile", "-o", str(out)],
    ) as server:
        run_async(_send(server.base_url, _requests(server.base_url, n)))
    # Leaving ``serve`` sent SIGTERM: the server drained and exited, cProfile wrote.
    return pstats.Stats(str(out))


def _where(key: tuple[str, int, str]) -> str:
    path, line, name = key
    for marker in ("site-packages/", "/src/"):
        path = path.split(marker)[-1]
    return f"{name} ({path}:{line})" if path != "~" else name


def _package(key: tuple[str, int, str]) -> str:
    path = key[0]
    if path == "~":
        return "built-ins (C)"
    for marker in ("site-packages/", "/src/"):
        if marker in path:
            parts = path.split(marker)[-1].split("/")
            return "/".join(parts[:2]) if parts[0] == "fake_openai_server" else parts[0]
    return "standard library"


def measure(args: argparse.Namespace, hf_home: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-calls-"))
    try:
        once = _profile(hf_home, work, args.requests, args)
        twice = _profile(hf_home, work, 2 * args.requests, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.requests
    first: dict[Any, Any] = once.stats  # type: ignore[attr-defined]
    second: dict[Any, Any] = twice.stats  # type: ignore[attr-defined]
    per_function: Counter[str] = Counter()
    per_package: Counter[str] = Counter()
    for key, row in second.items():
        calls = (row[1] - (first[key][1] if key in first else 0)) / n
        if calls > 0:
            per_function[_where(key)] += calls
            per_package[_package(key)] += calls
    total = (twice.total_calls - once.total_calls) / n  # type: ignore[attr-defined]
    return {
        "calls_per_request": total,
        "by_package": dict(per_package.most_common()),
        "top_functions": dict(per_function.most_common(args.top)),
    }


def render(results: dict[str, Any]) -> str:
    source = results["server_source"]
    lines = [
        "# Python function calls per request in the API process",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}",
        "",
        f"- Machine: {results['machine'].get('cpu', '?')} (the count hardly depends on it)",
        f"- Server: commit {str(source.get('commit', '?'))[:12]}"
        + (" (with uncommitted changes)" if source.get("dirty") else "")
        + f"; imports `{source.get('imported_from', '?')}`",
        f"- Server settings: {results['server_settings'] or 'defaults'}",
        f"- Requests: {results['requests']} and {2 * results['requests']} one-text requests "
        f"(300 characters) from {CLIENTS} connections, {results['shape']} stand-in on CPU; the "
        "difference of the two runs, per request",
        "",
        f"**{results['calls_per_request']:,.0f} Python function calls per request** "
        "(cProfile, the API process's main thread; a call into C counts once)",
        "",
        "| package | calls per request |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:,.1f} |" for k, v in results["by_package"].items() if v >= 0.5]
    lines += ["", "| function | calls per request |", "|---|---:|"]
    lines += [f"| `{k}` | {v:,.1f} |" for k, v in results["top_functions"].items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.calls", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--shape", choices=sorted(standins.BERT_SHAPES), default="null")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--top", type=int, default=30, help="functions listed")
    return parse_with_server_options(parser, argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    given = argv if argv is not None else sys.argv[1:]
    results: dict[str, Any] = {
        "command": f"uv run python -m bench.calls {shlex.join(given)}".strip(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info("cpu"),
        "server_source": source_info(args.server_src),
        "server_settings": args.server_env,
        "shape": args.shape,
        "requests": args.requests,
    }
    hf_home = args.hf_home or Path(tempfile.mkdtemp(prefix="bench-calls-hf-"))
    try:
        if not args.reuse:
            standins.build_ruri_large(hf_home, args.shape)
        results.update(measure(args, hf_home))
    finally:
        if args.hf_home is None:
            shutil.rmtree(hf_home, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "calls" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    (args.out / f"{stem}.md").write_text(render(results))
    print(render(results))
    return results


if __name__ == "__main__":
    main()
