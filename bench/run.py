"""How close the server comes to the model itself: the benchmark of issue 3.

Run it from the repository root (``bench`` is a package)::

    uv run python -m bench.run --shape small              # a few minutes on 2 CPU cores
    uv run python -m bench.run --shape full               # ruri-large / reranker-310m shapes
    uv run python -m bench.run --shape small --scenarios 1 4
    uv run python -m bench.run --shape full --device cuda # float16 on a GPU

It builds random-weight stand-ins with the real architectures and tokenizers
(``tests.support.standins``) in a temporary Hugging Face cache, then, in one
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.client import loop_name, run_async
from bench.measure import (
    embed_ceiling,
    encoder_flops,
    free_memory,
    machine_info,
    matmul_gflops,
    model_config,
    rerank_ceiling,
    sample_gpu,
    token_counts,
    tokenizer_rate,
)
from bench.report import finish, render
from bench.server import (
    embeddings_scenarios,
    min_cosine,
    parse_with_server_options,
    rerank_scenarios,
    serve,
    server_dtype,
    source_info,
    tell_server_logs,
)
from bench.workload import (
    EMBED_MODEL,
    LENGTHS,
    PLANS,
    QUERY,
    RERANK_MODEL,
    SCENARIOS,
    Plan,
    corpus_texts,
    embedding_texts,
    plan_for,
    single_texts,
    texts_300,
)
from tests.support import standins


# --- the run ---------------------------------------------------------------------------
def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _snapshot(hf_home: Path, repo_id: str) -> Path:
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    return repo / "snapshots" / (repo / "refs" / "main").read_text().strip()


def _ratios(per_s: float, ceilings: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {f"vs_{name}": per_s / c["per_s"] for name, c in ceilings.items()}


def _ceilings(
    measure: Any, device: str, precision: str, plan: Plan, what: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """encode/predict at float32 and at the server's precision, and the model alone at the
    server's precision (loaded once with the latter). Returns results and the Ceilings."""
    results: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    for dtype_name, sizes in (("float32", plan.batch_sizes_float32), (precision, plan.batch_sizes)):
        if dtype_name in results:
            continue
        alone = plan.model_alone_batch_sizes if dtype_name == precision else ()
        _log(f"{what} ceiling in-process, {dtype_name}, batch sizes {sizes}")
        ceiling = measure(dtype_name, sizes, alone)
        free_memory(device)
        results[dtype_name] = ceiling.result
        kept[dtype_name] = ceiling
        _log(f"  {ceiling.result['per_s']:.2f}/s (batch {ceiling.result['best_batch_size']})")
        if ceiling.model_alone is not None:
            results["model_alone"] = {**ceiling.model_alone, "dtype": dtype_name}
            _log(
                f"  model alone: {ceiling.model_alone['per_s']:.2f}/s "
                f"(batch {ceiling.model_alone['best_batch_size']})"
            )
    return results, kept


def run_embeddings(
    hf_home: Path,
    device: str,
    precision: str,
    plan: Plan,
    wanted: set[str],
    log_dir: Path,
    server_env: dict[str, str],
    server_src: Path | None,
) -> dict[str, Any]:
    snapshot = _snapshot(hf_home, EMBED_MODEL)
    config = model_config(snapshot)
    corpus = corpus_texts(plan.corpus)
    singles = single_texts(plan)
    corpus_tokens = token_counts(snapshot, corpus)
    texts = embedding_texts(plan, wanted)
    tokens: dict[str, list[int]] = {"corpus": corpus_tokens}
    for key, items in texts.items():
        if key in ("1", "2u"):
            tokens[key] = token_counts(snapshot, items)
        else:  # the corpus, cycled
            tokens[key] = [corpus_tokens[i % len(corpus)] for i in range(len(items))]
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
    }
    part["ceiling"], kept = _ceilings(
        lambda dtype_name, sizes, alone: embed_ceiling(
            snapshot, device, dtype_name, corpus, singles, sizes, alone
        ),
        device,
        precision,
        plan,
        "embeddings",
    )
    for c in part["ceiling"].values():
        c["gflops"] = c["per_s"] * part["corpus"]["gflop_per_text"]

    _log("embeddings server: starting")
    with serve(hf_home, "embeddings", device, log_dir, server_env, server_src) as server:
        part["server"] = {
            "startup_s": server.startup_s,
            **run_async(server_dtype(server, EMBED_MODEL)),
        }
        _log(f"  ready in {server.startup_s:.1f}s, dtype {part['server']['dtype']}")
        scenarios, outputs = run_async(embeddings_scenarios(server, plan, texts))
        part["server"].update(
            startup_peak_rss_mib=server.startup_peak_rss_mib,
            peak_rss_mib=server.peak_rss_mib,
            peak_rss_per_scenario=server.peak_resets,
        )
    ceilings = part["ceiling"]
    reference = kept[precision].outputs
    for key, result in scenarios.items():
        if key == "0":
            _log(f"  scenario 0 (GET /health): {result['per_s']:.0f} requests/s")
            continue
        rounds = result["texts"] / len(texts[key])
        result["client_tokens"] = round(rounds * sum(tokens[key]))
        result["gflops"] = rounds * flops[key] / result["wall_s"] / 1e9
        if key == "1":
            # Speed against one in-process encode of one text (p50 over p50); for the
            # model alone, against the forward pass of one pre-tokenized text.
            result["ratios"] = {
                f"vs_{name}": c["single_text_p50_ms"] / result["p50_ms"]
                for name, c in ceilings.items()
            }
            result["p50_vs_in_process"] = (
                result["p50_ms"] / ceilings[precision]["single_text_p50_ms"]
            )
            single = kept[precision].single_outputs
            result["min_cosine_to_in_process"] = min_cosine(outputs[key], single)
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
    server_src: Path | None,
) -> dict[str, Any]:
    snapshot = _snapshot(hf_home, RERANK_MODEL)
    config = model_config(snapshot)
    pool = corpus_texts(max(plan.rerank_pairs, plan.documents), seed=7000)
    documents = pool[: plan.documents]
    pool_tokens = token_counts(snapshot, pool, query=QUERY)
    tokens = pool_tokens[: plan.documents]
    flops = [encoder_flops(config, n) for n in pool_tokens]
    part: dict[str, Any] = {
        "model": RERANK_MODEL,
        "shape": _shape(config),
        "pairs": {
            "documents": len(documents),
            "ceiling_pairs": len(pool),
            "chars": list(LENGTHS),
            "query_chars": len(QUERY),
            "mean_tokens": statistics.fmean(pool_tokens),
            "request_mean_tokens": statistics.fmean(tokens),
            "gflop_per_pair": statistics.fmean(flops) / 1e9,
        },
    }
    part["ceiling"], kept = _ceilings(
        lambda dtype_name, sizes, alone: rerank_ceiling(
            snapshot, device, dtype_name, QUERY, pool, sizes, alone
        ),
        device,
        precision,
        plan,
        "rerank",
    )
    for c in part["ceiling"].values():
        c["gflops"] = c["per_s"] * part["pairs"]["gflop_per_pair"]

    _log("rerank server: starting")
    with serve(hf_home, "reranker", device, log_dir, server_env, server_src) as server:
        part["server"] = {
            "startup_s": server.startup_s,
            **run_async(server_dtype(server, RERANK_MODEL)),
        }
        _log(f"  ready in {server.startup_s:.1f}s, dtype {part['server']['dtype']}")
        scenarios, served = run_async(rerank_scenarios(server, plan, QUERY, documents))
        part["server"].update(
            startup_peak_rss_mib=server.startup_peak_rss_mib,
            peak_rss_mib=server.peak_rss_mib,
            peak_rss_per_scenario=server.peak_resets,
        )
    expected = kept[precision].outputs[: plan.documents]
    for key, result in scenarios.items():
        result["client_tokens"] = sum(tokens) * result["requests"]
        result["ratios"] = _ratios(result["per_s"], part["ceiling"])
        result["gflops"] = (
            result["requests"] * sum(flops[: plan.documents]) / result["wall_s"] / 1e9
        )
        result["max_score_difference"] = float(np.abs(served - expected).max())
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
    if result.get("mean_batch_size") is not None:
        parts.append(f"mean batch {result['mean_batch_size']:.1f}")
    if result.get("gpu_busy") is not None:
        parts.append(f"GPU busy {result['gpu_busy']:.0%}")
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
    args = parse_with_server_options(parser, argv)
    names = {v: k for k, v in SCENARIOS.items()}
    wanted = set()
    for item in args.scenarios:
        key = names.get(item, item)
        if key not in SCENARIOS:
            parser.error(f"unknown scenario {item!r}: use 1-4 or {', '.join(SCENARIOS.values())}")
        wanted.add(key)
    args.scenarios = wanted
    return args


def _sizes_note(plan: Plan, shape: str, device: str) -> str:
    note = (
        f"scenario 0: {plan.health_requests} GET /health from {plan.health_clients} clients; "
        f"scenario 1: {plan.sequential} requests; scenario 2: {plan.corpus} one-text requests "
        f"from {plan.clients} clients; 2-256: {plan.many_requests} from {plan.many_clients} "
        f"clients; 2u: {plan.uniform_requests} from {plan.uniform_clients} clients; scenario 3: "
        f"{plan.bulk_repeats} request(s) of {plan.bulk} texts; scenario 4: {plan.documents} "
        f"documents per request, {plan.rerank_sequential} sequential requests, "
        f"{plan.rerank_concurrent} requests from {plan.rerank_clients} clients; in-process batch "
        f"sizes float32 {list(plan.batch_sizes_float32)}, server precision "
        f"{list(plan.batch_sizes)}, model alone {list(plan.model_alone_batch_sizes)}"
    )
    if shape == "full" and device == "cpu":
        note += " (cut down so that the full shape finishes in about 20 minutes here)"
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
    command = " ".join(
        ["uv run python -m bench.run", shlex.join(argv if argv is not None else sys.argv[1:])]
    ).strip()
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
        "server_source": source_info(args.server_src),
        "client": {"http": "bench.client (raw HTTP/1.1, keep-alive)", "loop": loop_name()},
        "load_before": list(load_before),
    }
    _log(f"{args.shape} shape on {device}; server precision {precision.dtype}")
    temporary = args.hf_home is None
    hf_home = args.hf_home or Path(tempfile.mkdtemp(prefix="bench-hf-"))
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    stack = contextlib.ExitStack()
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
        gpu = stack.enter_context(sample_gpu(device))
        results["gpu_sampler"] = gpu.source if gpu is not None else None
        if args.scenarios & {"1", "2", "3"}:
            results["tokenizer"]["embeddings_texts_per_s"] = tokenizer_rate(
                _snapshot(hf_home, EMBED_MODEL), texts_300(plan.tokenizer_texts, seed=9000)
            )
            results["embeddings"] = run_embeddings(
                hf_home,
                device,
                precision.dtype,
                plan,
                args.scenarios,
                log_dir,
                args.server_env,
                args.server_src,
            )
            if "4" in args.scenarios:  # kept if the rerank part is cut off (a time limit)
                _write(results, args.out, device, args.tag, started, partial="rerank")
        if "4" in args.scenarios:
            results["tokenizer"]["rerank_pairs_per_s"] = tokenizer_rate(
                _snapshot(hf_home, RERANK_MODEL),
                corpus_texts(plan.tokenizer_texts, seed=9000),
                pairs_with=QUERY,
            )
            results["rerank"] = run_rerank(
                hf_home, device, precision.dtype, plan, log_dir, args.server_env, args.server_src
            )
    except BaseException:
        tell_server_logs(log_dir, _log)
        raise
    finally:
        stack.close()
        shutil.rmtree(log_dir, ignore_errors=True)
        if temporary:
            shutil.rmtree(hf_home, ignore_errors=True)
    _write(results, args.out, device, args.tag, started)
    return results


def _write(
    results: dict[str, Any],
    out: Path,
    device: str,
    tag: str | None,
    started: float,
    *,
    partial: str | None = None,
) -> None:
    """The report so far, as Markdown and JSON; ``partial`` names the part still to run."""
    results["load_after"] = list(os.getloadavg())
    results["run_s"] = time.perf_counter() - started
    results["partial"] = partial
    finish(results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "-".join(filter(None, [results["shape"], device, tag]))
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    stem.with_suffix(".md").write_text(render(results))
    _log(f"wrote {stem}.md and {stem}.json in {results['run_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
