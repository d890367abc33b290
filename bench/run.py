"""How close the server comes to the model itself: the benchmark of issue 3.

Run it from the repository root (``bench`` is a package)::

    uv run python -m bench.run --shape small              # a few minutes on 2 CPU cores
    uv run python -m bench.run --shape full               # ruri-large / reranker-310m shapes
    uv run python -m bench.run --shape small --scenarios 1 4
    uv run python -m bench.run --shape full --device cuda # float16 on a GPU

It builds random-weight stand-ins with the real architectures and tokenizers
(``fake_openai_server.standins``) in a temporary Hugging Face cache, then, in one
process tree:

1. the ceiling, in this process: ``SentenceTransformer.encode`` /
   ``CrossEncoder.predict`` on the same texts at float32 and at the precision the
   server picks (``DTYPE=auto``: bfloat16 on a CPU with native bfloat16, float16 on
   CUDA), at the best of a few batch sizes; plus one text at a time;
2. the real server, ``python -m fake_openai_server`` in a subprocess with its
   default settings, over HTTP (httpx):

   1. Dify indexing: one client, sequential requests of one text (p50/p99 latency);
   2. 32 concurrent clients, one text per request (texts/s);
   3. bulk: one request of 256 texts, base64 as the openai SDK asks (texts/s);
   4. rerank: one query x 32 documents, sequential and 8 concurrent clients;

   with the engine's batch statistics from ``/info`` (differences before and
   after each scenario), the server's peak RSS (``VmHWM``, reset per scenario),
   and the CPU time of the server, of this client and of everything else on
   the machine (other work running beside the benchmark skews it);
3. the tokenizers alone, single thread, beside the model's texts/s;
4. a plain matrix product in float32 and in the server's precision, the
   physical ceiling, against which the FLOPs per text (from the model's shape
   and token counts) put each scenario.

Results go to ``<out>/<shape>-<device>.md`` and ``.json``. Texts are Japanese
chunks of 100, 300 and 500 characters in equal parts. Scenario sizes are cut per
shape so that a run ends in minutes (see ``PLANS``); the output says what ran.
The ``tiny`` shape exists for the harness's own smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.measure import (
    embed_ceiling,
    encoder_flops,
    free_memory,
    machine_info,
    matmul_gflops,
    model_config,
    rerank_ceiling,
    token_counts,
    tokenizer_rate,
)
from bench.report import finish, render
from bench.server import embeddings_scenarios, min_cosine, rerank_scenarios, serve, server_dtype
from bench.workload import (
    EMBED_MODEL,
    LENGTHS,
    PLANS,
    QUERY,
    RERANK_MODEL,
    SCENARIOS,
    Plan,
    corpus_texts,
    cycle,
    plan_for,
    texts_300,
)
from fake_openai_server import standins


# --- the run ---------------------------------------------------------------------------
def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _snapshot(hf_home: Path, repo_id: str) -> Path:
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    return repo / "snapshots" / (repo / "refs" / "main").read_text().strip()


def _ratios(per_s: float, ceilings: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {f"vs_{name}": per_s / c["per_s"] for name, c in ceilings.items()}


def run_embeddings(
    hf_home: Path,
    device: str,
    precision: str,
    plan: Plan,
    wanted: set[str],
    log_dir: Path,
    server_env: dict[str, str],
) -> dict[str, Any]:
    snapshot = _snapshot(hf_home, EMBED_MODEL)
    config = model_config(snapshot)
    corpus = corpus_texts(plan.corpus)
    singles = texts_300(plan.sequential, seed=5000)
    texts: dict[str, list[str]] = {}
    if "1" in wanted:
        texts["1"] = singles
    if "2" in wanted:
        texts["2"] = corpus
        texts["2u"] = texts_300(plan.corpus, seed=3000)
    if "3" in wanted:
        texts["3"] = cycle(corpus, plan.bulk)
    tokens = {
        key: token_counts(snapshot, items) for key, items in {"corpus": corpus, **texts}.items()
    }
    flops = {key: sum(encoder_flops(config, n) for n in counts) for key, counts in tokens.items()}
    part: dict[str, Any] = {
        "model": EMBED_MODEL,
        "shape": _shape(config),
        "corpus": {
            "texts": len(corpus),
            "chars": list(LENGTHS),
            "mean_tokens": statistics.fmean(tokens["corpus"]),
            "gflop_per_text": flops["corpus"] / len(corpus) / 1e9,
        },
        "texts": {
            key: {"texts": len(items), "mean_tokens": statistics.fmean(tokens[key])}
            for key, items in texts.items()
        },
        "ceiling": {},
    }
    vectors: dict[str, np.ndarray] = {}
    single_vectors: dict[str, np.ndarray] = {}
    for dtype_name, sizes in (("float32", plan.batch_sizes_float32), (precision, plan.batch_sizes)):
        if dtype_name in part["ceiling"]:
            continue
        _log(f"embeddings ceiling in-process, {dtype_name}, batch sizes {sizes}")
        result, vectors[dtype_name], single_vectors[dtype_name] = embed_ceiling(
            snapshot, device, dtype_name, corpus, singles, sizes
        )
        free_memory(device)
        result["gflops"] = result["per_s"] * part["corpus"]["gflop_per_text"]
        part["ceiling"][dtype_name] = result
        _log(f"  {result['per_s']:.2f} texts/s (batch {result['best_batch_size']})")

    _log("embeddings server: starting")
    with serve(hf_home, "embeddings", device, log_dir, server_env) as server:
        part["server"] = {
            "startup_s": server.startup_s,
            **asyncio.run(server_dtype(server, EMBED_MODEL)),
        }
        _log(f"  ready in {server.startup_s:.1f}s, dtype {part['server']['dtype']}")
        scenarios, outputs = asyncio.run(embeddings_scenarios(server, plan, texts))
        part["server"].update(
            startup_peak_rss_mib=server.startup_peak_rss_mib,
            peak_rss_mib=server.peak_rss_mib,
            peak_rss_per_scenario=server.peak_resets,
        )
    ceilings = part["ceiling"]
    reference = vectors[precision]
    for key, result in scenarios.items():
        rounds = result["texts"] / len(texts[key])
        result["client_tokens"] = round(rounds * sum(tokens[key]))
        result["gflops"] = rounds * flops[key] / result["wall_s"] / 1e9
        if key == "1":
            # Speed against one in-process encode of one text (p50 over p50).
            result["ratios"] = {
                f"vs_{name}": c["single_text_p50_ms"] / result["p50_ms"]
                for name, c in ceilings.items()
            }
            result["p50_vs_in_process"] = (
                result["p50_ms"] / ceilings[precision]["single_text_p50_ms"]
            )
            result["min_cosine_to_in_process"] = min_cosine(outputs[key], single_vectors[precision])
        else:
            # 2u has texts of one length; its ratios are to the ceiling on the mixed texts.
            result["ratios"] = _ratios(result["per_s"], ceilings)
            if key != "2u":
                expected = reference[np.arange(len(outputs[key])) % len(reference)]
                result["min_cosine_to_in_process"] = min_cosine(outputs[key], expected)
        _log(f"  scenario {key}: {_brief(result)}")
    part["scenarios"] = scenarios
    return part


def run_rerank(
    hf_home: Path,
    device: str,
    precision: str,
    plan: Plan,
    log_dir: Path,
    server_env: dict[str, str],
) -> dict[str, Any]:
    snapshot = _snapshot(hf_home, RERANK_MODEL)
    config = model_config(snapshot)
    documents = corpus_texts(plan.documents, seed=7000)
    tokens = token_counts(snapshot, documents, query=QUERY)
    flops = [encoder_flops(config, n) for n in tokens]
    part: dict[str, Any] = {
        "model": RERANK_MODEL,
        "shape": _shape(config),
        "pairs": {
            "documents": len(documents),
            "chars": list(LENGTHS),
            "query_chars": len(QUERY),
            "mean_tokens": statistics.fmean(tokens),
            "gflop_per_pair": statistics.fmean(flops) / 1e9,
        },
        "ceiling": {},
    }
    scores: dict[str, np.ndarray] = {}
    for dtype_name, sizes in (("float32", plan.batch_sizes_float32), (precision, plan.batch_sizes)):
        if dtype_name in part["ceiling"]:
            continue
        _log(f"rerank ceiling in-process, {dtype_name}, batch sizes {sizes}")
        result, scores[dtype_name] = rerank_ceiling(
            snapshot, device, dtype_name, QUERY, documents, sizes
        )
        free_memory(device)
        result["gflops"] = result["per_s"] * part["pairs"]["gflop_per_pair"]
        part["ceiling"][dtype_name] = result
        _log(f"  {result['per_s']:.2f} pairs/s (batch {result['best_batch_size']})")

    _log("rerank server: starting")
    with serve(hf_home, "reranker", device, log_dir, server_env) as server:
        part["server"] = {
            "startup_s": server.startup_s,
            **asyncio.run(server_dtype(server, RERANK_MODEL)),
        }
        _log(f"  ready in {server.startup_s:.1f}s, dtype {part['server']['dtype']}")
        scenarios, served = asyncio.run(rerank_scenarios(server, plan, QUERY, documents))
        part["server"].update(
            startup_peak_rss_mib=server.startup_peak_rss_mib,
            peak_rss_mib=server.peak_rss_mib,
            peak_rss_per_scenario=server.peak_resets,
        )
    for key, result in scenarios.items():
        result["client_tokens"] = sum(tokens) * result["requests"]
        result["ratios"] = _ratios(result["per_s"], part["ceiling"])
        result["gflops"] = result["per_s"] * part["pairs"]["gflop_per_pair"]
        result["max_score_difference"] = float(np.abs(served - scores[precision]).max())
        _log(f"  scenario {key}: {_brief(result)}")
    part["scenarios"] = scenarios
    return part


def _shape(config: Any) -> dict[str, Any]:
    return {
        "architecture": config.model_type,
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
    }


def _brief(result: dict[str, Any]) -> str:
    parts = [f"{result['per_s']:.2f}/s"]
    if "p50_ms" in result:
        parts.append(f"p50 {result['p50_ms']:.1f} ms")
    parts.append(f"mean batch {result['mean_batch_size']:.1f}")
    parts += [f"{k} {v:.2f}x" for k, v in result["ratios"].items()]
    return ", ".join(parts)


# --- main -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--shape", choices=sorted(PLANS), default="small")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=sorted(SCENARIOS),
        metavar="N",
        help="1 sequential, 2 concurrent, 3 bulk, 4 rerank (names work too); default all",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
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
    args = parser.parse_args(argv)
    names = {v: k for k, v in SCENARIOS.items()}
    wanted = set()
    for item in args.scenarios:
        key = names.get(item, item)
        if key not in SCENARIOS:
            parser.error(f"unknown scenario {item!r}: use 1-4 or {', '.join(SCENARIOS.values())}")
        wanted.add(key)
    args.scenarios = wanted
    pairs = [item.partition("=") for item in args.server_env]
    if any(not name or not sep for name, sep, _ in pairs):
        parser.error("--server-env takes NAME=VALUE pairs")
    args.server_env = {name.upper(): value for name, _, value in pairs}
    if args.reuse and args.hf_home is None:
        parser.error("--reuse needs --hf-home")
    return args


def _sizes_note(plan: Plan, shape: str, device: str) -> str:
    note = (
        f"scenario 1: {plan.sequential} requests; scenario 2: {plan.corpus} one-text requests "
        f"from {plan.clients} clients; scenario 3: {plan.bulk_repeats} request(s) of "
        f"{plan.bulk} texts; scenario 4: {plan.documents} documents per request, "
        f"{plan.rerank_sequential} sequential requests, {plan.rerank_concurrent} requests from "
        f"{plan.rerank_clients} clients; in-process batch sizes float32 "
        f"{list(plan.batch_sizes_float32)}, server precision {list(plan.batch_sizes)}"
    )
    if shape == "full" and device == "cpu":
        note += " (cut down so that the full shape finishes in about a quarter of an hour here)"
    return note


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    load_before = os.getloadavg()
    import torch

    from fake_openai_server.backends.sentence_transformers import resolve_precision

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(device, "auto")
    plan = plan_for(args.shape, device)
    command = "uv run python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    results: dict[str, Any] = {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "shape": args.shape,
        "device": device,
        "machine": machine_info(device),
        "precision": precision.dtype,
        "precision_reason": precision.reason,
        "plan": asdict(plan),
        "sizes_note": _sizes_note(plan, args.shape, device),
        "server_settings": args.server_env,
        "load_before": list(load_before),
    }
    _log(f"{args.shape} shape on {device}; server precision {precision.dtype}")
    temporary = args.hf_home is None
    hf_home = args.hf_home or Path(tempfile.mkdtemp(prefix="bench-hf-"))
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    try:
        if not args.reuse:
            _log(f"building {args.shape} stand-ins under {hf_home}")
            build = time.perf_counter()
            if args.scenarios & {"1", "2", "3"}:
                standins.build_ruri_large(hf_home, args.shape)
            if "4" in args.scenarios:
                standins.build_reranker(hf_home, args.shape)
            results["build_s"] = time.perf_counter() - build
        results["matmul_n"] = plan.matmul_n
        results["matmul_gflops"] = {
            name: matmul_gflops(name, device, plan.matmul_n)
            for name in dict.fromkeys(("float32", precision.dtype))
        }
        _log(f"matmul GFLOP/s: {results['matmul_gflops']}")
        results["tokenizer"] = {}
        if args.scenarios & {"1", "2", "3"}:
            results["tokenizer"]["embeddings_texts_per_s"] = tokenizer_rate(
                _snapshot(hf_home, EMBED_MODEL), texts_300(plan.tokenizer_texts, seed=9000)
            )
            results["embeddings"] = run_embeddings(
                hf_home, device, precision.dtype, plan, args.scenarios, log_dir, args.server_env
            )
        if "4" in args.scenarios:
            results["tokenizer"]["rerank_pairs_per_s"] = tokenizer_rate(
                _snapshot(hf_home, RERANK_MODEL),
                corpus_texts(plan.tokenizer_texts, seed=9000),
                pairs_with=QUERY,
            )
            results["rerank"] = run_rerank(
                hf_home, device, precision.dtype, plan, log_dir, args.server_env
            )
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
        if temporary:
            shutil.rmtree(hf_home, ignore_errors=True)
    results["load_after"] = list(os.getloadavg())
    results["run_s"] = time.perf_counter() - started
    finish(results)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.shape}-{device}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    stem.with_suffix(".md").write_text(render(results))
    _log(f"wrote {stem}.md and {stem}.json in {results['run_s'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
