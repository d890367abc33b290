"""Verdicts against the targets of issues 3 and 9, diagnostics, and the markdown report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


# --- verdicts ---------------------------------------------------------------------------
def _target(name: str, wanted: str, measured: float, met: bool, unit: str = "x") -> dict[str, Any]:
    return {"target": name, "wanted": wanted, "measured": measured, "unit": unit, "met": met}


def targets(shape: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue 3, set for this 2-core CPU (small and full shapes on CPU)."""
    if shape in ("tiny", "null") or results.get("device", "cpu") != "cpu":
        return []
    rows = []
    emb = results.get("embeddings", {}).get("scenarios", {})
    bulk = 3.0 if shape == "full" else 2.0
    if "1" in emb:
        ratio = emb["1"]["p50_vs_in_process"]
        rows.append(
            _target(
                "1: p50 / one in-process encode (same precision)", "≤ 1.05", ratio, ratio <= 1.05
            )
        )
    for key, label in (("2", "2: 32 one-text clients"), ("3", "3: requests of many texts")):
        if key in emb:
            ratio = emb[key]["ratios"]["vs_float32"]
            rows.append(
                _target(f"{label}, vs float32 in-process", f"≥ {bulk:.1f}", ratio, ratio >= bulk)
            )
            if shape == "full":
                frac = emb[key]["matmul_ceiling_fraction"]
                rows.append(
                    _target(f"{label}, of the matmul ceiling", "≥ 65%", frac, frac >= 0.65, "%")
                )
    for key, label in (("2", "mixed lengths"), ("2u", "300-character texts")):
        if key in emb and emb[key].get("mean_batch_size") is not None:
            size = emb[key]["mean_batch_size"]
            rows.append(
                _target(f"{key}: mean forward batch, {label}", "≥ 16", size, size >= 16, "texts")
            )
    rerank = results.get("rerank", {}).get("scenarios", {})
    if "4-concurrent" in rerank:
        ratio = rerank["4-concurrent"]["ratios"]["vs_float32"]
        clients = rerank["4-concurrent"].get("clients", 8)
        rows.append(
            _target(
                f"4: rerank, {clients} clients, vs float32 in-process", "≥ 2.0", ratio, ratio >= 2.0
            )
        )
    tokenizer = results.get("tokenizer", {}).get("embeddings_texts_per_s")
    served = [s["per_s"] for k, s in emb.items() if k in ("2", "3")]
    if tokenizer and served:
        rows.append(
            _target(
                "tokenizer (1 thread) faster than the server",
                f"> {max(served):.1f} texts/s",
                tokenizer,
                tokenizer > max(served),
                "texts/s",
            )
        )
    return rows


def targets_issue9(shape: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 9's targets: the server's own ceiling (null shape, set for the 2-core CPU) and,
    on CUDA, the server against the model alone (set for the full shape on an H100)."""
    emb = results.get("embeddings", {}).get("scenarios", {})
    rerank = results.get("rerank", {}).get("scenarios", {})
    rows = []
    if shape == "null":
        two_u = emb.get("2u")
        if two_u:
            value = two_u["requests_per_s"]
            rows.append(
                _target(
                    f"{two_u['clients']} clients × one 300-character text",
                    "≥ 1,200 requests/s (64 clients)",
                    value,
                    value >= 1200 and two_u["clients"] == 64,
                    "requests/s",
                )
            )
        if "3" in emb:
            value = emb["3"]["per_s"]
            texts = emb["3"]["texts"] // max(1, emb["3"]["requests"])
            rows.append(
                _target(
                    f"requests of {texts} texts", "≥ 2,500 texts/s", value, value >= 2500, "texts/s"
                )
            )
        if "1" in emb:
            value = emb["1"]["p50_ms"]
            rows.append(_target("one client, one text: p50", "≤ 5 ms", value, value <= 5, "ms"))
        four = rerank.get("4-concurrent")
        if four:
            value = four["per_s"]
            rows.append(
                _target(
                    f"rerank, {four['clients']} clients × "
                    f"{four['pairs'] // max(1, four['requests'])} documents",
                    "≥ 2,500 pairs/s",
                    value,
                    value >= 2500,
                    "pairs/s",
                )
            )
        return rows
    if results.get("device") != "cuda" or shape == "tiny":
        return rows
    for key, label, wanted in (
        ("2-256", "256 one-text clients", 0.80),
        ("2", "32 one-text clients", 0.50),
        ("3", "requests of many texts", 0.90),
    ):
        s = emb.get(key)
        if s and "vs_model_alone" in s["ratios"]:
            ratio = s["ratios"]["vs_model_alone"]
            clients = s.get("clients")
            if key == "3":
                label = f"requests of {s['texts'] // max(1, s['requests'])} texts"
            elif clients:
                label = f"{clients} one-text clients"
            rows.append(
                _target(f"{label} / the model alone", f"≥ {wanted:.2f}", ratio, ratio >= wanted)
            )
            if key == "2-256":
                busy = s.get("gpu_busy")
                rows.append(
                    _target(
                        f"{label}: GPU busy",
                        "≥ 80%",
                        busy,
                        busy is not None and busy >= 0.80,
                        "%",
                    )
                )
    four = rerank.get("4-concurrent")
    if four and "vs_model_alone" in four["ratios"]:
        ratio = four["ratios"]["vs_model_alone"]
        rows.append(
            _target(
                f"rerank, {four['clients']} clients × "
                f"{four['pairs'] // max(1, four['requests'])} documents / the CrossEncoder alone",
                "≥ 0.90",
                ratio,
                ratio >= 0.90,
            )
        )
    if "1" in emb:
        ratio = emb["1"]["p50_vs_in_process"]
        rows.append(
            _target(
                "one client, one text: p50 / one in-process encode", "≤ 1.10", ratio, ratio <= 1.10
            )
        )
    return rows


def diagnostics(results: dict[str, Any]) -> list[str]:
    """What limits each scenario, read off the meters."""
    cores = results["machine"]["cores"] or 1
    precision = results["precision"]
    lines = []
    emb = results.get("embeddings", {})
    one = emb.get("scenarios", {}).get("1")
    if one and one.get("forward_ms_mean") is not None:
        in_process = emb["ceiling"][precision]["single_text_p50_ms"]
        forward = one["forward_ms_mean"]
        alone = emb["ceiling"].get("model_alone", {}).get("single_text_p50_ms")
        lines.append(
            f"scenario 1: p50 {one['p50_ms']:.1f} ms = forward pass {forward:.1f} ms "
            f"(mean, in the server) + {one['p50_ms'] - forward:.1f} ms outside the "
            f"model (HTTP, JSON, tokenization, thread hand-offs); in-process encode of one text "
            f"(tokenization included): {in_process:.1f} ms"
            + (f"; the model alone, one pre-tokenized text: {alone:.1f} ms." if alone else ".")
        )
    for part_name in ("embeddings", "rerank"):
        ceiling = results.get(part_name, {}).get("ceiling", {})
        if "float32" in ceiling and precision in ceiling and precision != "float32":
            gain = ceiling[precision]["per_s"] / ceiling["float32"]["per_s"]
            matmul = results["matmul_gflops"]
            lines.append(
                f"{part_name}: in-process {precision} is {gain:.2f}× in-process float32; a plain "
                f"matrix product is {matmul[precision] / matmul['float32']:.2f}× faster in "
                f"{precision} than in float32 here. Ratios to float32 above these come only "
                "from batching better than `encode`/`predict` do."
            )
    for part_name in ("embeddings", "rerank"):
        for key, s in results.get(part_name, {}).get("scenarios", {}).items():
            label = f"scenario {key} ({part_name})"
            busy = s.get("model_busy_fraction")
            idle = 1 - busy if busy is not None else 0.0
            if key != "0" and idle > 0.1:
                lines.append(
                    f"{label}: the model was idle {idle:.0%} of the wall time (HTTP, tokenization, "
                    "batch forming or JSON in series with it, or too few requests waiting)."
                )
            starved, drained = s.get("starved_fraction"), s.get("drained_fraction")
            if key != "0" and idle > 0.1 and starved is not None and drained is not None:
                lines.append(
                    f"{label}: no batch of the model was in the engine process {starved:.0%} "
                    f"of the wall time (nothing queued), and {drained:.0%} of the batches took "
                    "the last queued texts: where these are small, the model waited with work "
                    "queued (hand-offs to the engine process); where large, for requests still "
                    "on their way (clients, HTTP, tokenization)."
                )
            if key != "0" and s.get("queue_wait_ms") is not None and "p50_ms" in s:
                lines.append(
                    f"{label}: a text waited {s['queue_wait_ms']:.1f} ms in the queue on "
                    f"average (p50 latency {s['p50_ms']:.1f} ms; forward pass "
                    f"{s.get('forward_ms_mean') or 0:.1f} ms)."
                )
            if s.get("padding_efficiency") and s["padding_efficiency"] < 0.85:
                lines.append(
                    f"{label}: padding took {1 - s['padding_efficiency']:.0%} of the tokens "
                    "computed."
                )
            if s["other_load_cores"] > 0.15:
                lines.append(
                    f"{label}: other processes used {s['other_load_cores']:.2f} of {cores} cores "
                    "meanwhile; the numbers understate the server."
                )
            if "client_tokens" in s and s.get("tokens") not in (None, s["client_tokens"]):
                lines.append(
                    f"{label}: the server ran {s['tokens']} tokens, the benchmark's tokenizer "
                    f"counts {s['client_tokens']}: the server does not see the same inputs."
                )
            if s.get("stolen_cores", 0) > 0.05:
                lines.append(
                    f"{label}: the hypervisor took {s['stolen_cores']:.2f} cores (steal time)."
                )
            client = s["client_cpu_s"] / s["wall_s"]
            if client > 0.1:
                lines.append(
                    f"{label}: this benchmark's own HTTP client used {client:.2f} cores beside "
                    "the server"
                    + (
                        f" ({s['client_us_per_request']:.0f} µs of CPU per request)."
                        if "client_us_per_request" in s
                        else "."
                    )
                )
        for name, c in results.get(part_name, {}).get("ceiling", {}).items():
            if c["other_load_cores"] > 0.15:
                lines.append(
                    f"{part_name} in-process {name}: other processes used "
                    f"{c['other_load_cores']:.2f} cores meanwhile."
                )
    return lines


# --- output ----------------------------------------------------------------------------
def _f(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:
        return "–"
    return f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.0f}%"


def _source(results: dict[str, Any]) -> str:
    src = results.get("server_source")
    if not src:
        return "this tree"
    where = "this tree" if src.get("this_tree") else f"`{src['path']}` (`--server-src`)"
    commit = src.get("commit")
    if commit:
        where += f", commit {commit[:12]}"
        if src.get("subject"):
            where += f" ({src['subject']})"
        if src.get("dirty"):
            where += ", with uncommitted changes in src/"
    else:
        where += ", commit unknown (no git metadata, no COMMIT file)"
    if src.get("imported_from"):
        where += f"; the server imports `{src['imported_from']}`"
    return where


def _rows(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| target | wanted | measured | met |", "|---|---|---:|---|"]
    for row in rows:
        unit = row["unit"]
        if unit == "%":
            value = _pct(row["measured"])
        elif unit == "x":
            value = f"{_f(row['measured'])}×"
        else:
            value = f"{_f(row['measured'], 1 if unit == 'ms' else 0)} {unit}"
        met = "yes" if row["met"] else "**no**"
        out.append(f"| {row['target']} | {row['wanted']} | {value} | {met} |")
    return out + [""]


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    precision = results["precision"]
    mm = results["matmul_gflops"]
    client = results.get("client", {})
    out = [
        f"# Benchmark: {results['shape']} shape on {results['device']}",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}, run time {results['run_s'] / 60:.1f} min",
        "",
        *(
            [
                f"**Written before the {results['partial']} part ran** (kept in case a time "
                "limit cuts the run off; a complete run writes over it).",
                "",
            ]
            if results.get("partial")
            else []
        ),
        f"- Machine: {m['cpu']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; {m['cores']} cores, {m['torch_threads']} torch threads, {m['memory_gib']} GiB;"
        f" native bfloat16: {m['native_bfloat16']}",
        f"- Software: Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}, sentence-transformers {m['sentence_transformers']}",
        f"- Server: {_source(results)}",
        f"- Server precision (DTYPE=auto): **{precision}** — {results['precision_reason']}",
        "- Server settings: defaults"
        + "".join(f", {k}={v}" for k, v in results.get("server_settings", {}).items()),
        "- Matrix product ceiling ("
        + f"{results['matmul_n']}×{results['matmul_n']}): "
        + ", ".join(f"{k} {_f(v, 0)} GFLOP/s" for k, v in mm.items()),
        "- Load average (1/5/15 min, the benchmark included) before: "
        f"{' / '.join(_f(x) for x in results['load_before'])};"
        f" after: {' / '.join(_f(x) for x in results['load_after'])}",
        f"- {results['load_note']}",
        f"- Sizes: {results['sizes_note']}",
    ]
    if client:
        out.append(
            f"- Load generator: {client['http']} on {client['loop']}, one process, in this "
            "benchmark's process on the same machine (its CPU is the 'client CPU' column)"
        )
    if results["device"] == "cuda":
        sampler = results.get("gpu_sampler") or "none"
        out.append(
            f"- GPU busy: `utilization.gpu` (share of time a kernel ran) sampled every 0.2 s by "
            f"{sampler}, mean over each phase; GPU memory: the whole device's, peak"
            + ("" if sampler != "none" else " — no sampler available here: n/a")
        )
    out.append("")
    emb = results.get("embeddings")
    if emb:
        out += _render_part(emb, "texts", precision, results)
    rr = results.get("rerank")
    if rr:
        out += _render_part(rr, "pairs", precision, results)
    tok = results.get("tokenizer", {})
    if tok:
        out += [
            "## Tokenizers alone vs the model",
            "",
            "| tokenizer | per second, 1 thread | model in-process "
            f"({precision}) | model alone | server, best scenario |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, label, part, unit in (
            (
                "embeddings_texts_per_s",
                "MeCab + WordPiece (ruri-large), 300-char texts",
                emb,
                "texts",
            ),
            ("rerank_pairs_per_s", "SentencePiece (reranker), query + document pairs", rr, "pairs"),
        ):
            if key in tok and part:
                best = max(
                    (s["per_s"] for k, s in part["scenarios"].items() if k != "0"), default=None
                )
                alone = part["ceiling"].get("model_alone", {}).get("per_s")
                out.append(
                    f"| {label} | {_f(tok[key], 0)} {unit}/s | "
                    f"{_f(part['ceiling'][precision]['per_s'])} | {_f(alone)} | {_f(best)} |"
                )
        out.append("")
    rows = results.get("targets_issue9", [])
    if rows:
        note = []
        if results["shape"] == "null" and results["device"] != "cpu":
            note = ["The null-shape targets were set for the 2-core CPU; here only a guide.", ""]
        elif results["shape"] != "null" and results["shape"] != "full":
            note = [
                f"The GPU targets were set for the full shape; on {results['shape']} a guide.",
                "",
            ]
        out += ["## Targets of issue 9", "", *note, *_rows(rows)]
    rows = results.get("targets", [])
    if rows:
        out += ["## Targets of issue 3", "", *_rows(rows)]
    lines = results.get("diagnostics", [])
    if lines:
        out += ["## Diagnostics", ""] + [f"- {line}" for line in lines] + [""]
    return "\n".join(out)


SCENARIO_LABELS = {
    "0": "0 HTTP floor: GET /health",
    "1": "1 Dify indexing: 1 client, 1 text/request",
    "2": "2 many Dify users: 1 text/request",
    "2-256": "2-256 many more users: 1 text/request",
    "2u": "2u 1 text/request, 300-char texts only",
    "3": "3 bulk: requests of many texts (base64)",
    "4-sequential": "4 rerank, 1 client",
    "4-concurrent": "4 rerank, concurrent clients",
}


def _ceiling_label(name: str, c: dict[str, Any], method: str) -> str:
    if name == "model_alone":
        return f"model alone, {c.get('dtype', '')}"
    return f"`{method}`, {name}"


def _render_part(
    part: dict[str, Any], unit: str, precision: str, results: dict[str, Any]
) -> list[str]:
    shape = part["shape"]
    cuda = results["device"] == "cuda"
    title = "Embeddings" if unit == "texts" else "Rerank"
    method = "encode" if unit == "texts" else "predict"
    out = [
        f"## {title}: {part['model']} stand-in ({shape['architecture']}, {shape['hidden']} hidden, "
        f"{shape['layers']} layers, {shape['heads']} heads, {shape['intermediate']} intermediate, "
        f"vocabulary {shape['vocab']:,})",
        "",
    ]
    if unit == "texts":
        c = part["corpus"]
        out.append(
            f"Texts: {c['texts']} chunks of {'/'.join(map(str, c['chars']))} characters in equal "
            f"parts, mean {c['mean_tokens']:.0f} tokens, {c['gflop_per_text']:.1f} GFLOP per text "
            "(the in-process ceilings and scenario 2 use them; 2-256 and 3 repeat them to fill "
            "their requests). Scenarios 1 and 2u: texts of 300 characters only"
            + "".join(
                f"; {key}: {t['texts']} texts, mean {t['mean_tokens']:.0f} tokens"
                for key, t in part["texts"].items()
                if key in ("1", "2u")
            )
            + ". 2u shows batching when lengths allow it (the engine keeps texts of very "
            "different lengths apart to limit padding); its ratios are to the mixed-text ceiling."
        )
    else:
        p = part["pairs"]
        out.append(
            f"Pairs: one query of {p['query_chars']} characters × {p['documents']} documents of "
            f"{'/'.join(map(str, p['chars']))} characters per request, mean "
            f"{p.get('request_mean_tokens', p['mean_tokens']):.0f} tokens; the ceilings run "
            f"{p.get('ceiling_pairs', p['documents'])} such pairs (mean {p['mean_tokens']:.0f} "
            f"tokens), {p['gflop_per_pair']:.1f} GFLOP per pair."
        )
    s = part["server"]
    out += [
        "",
        f"Server: dtype {s['dtype']} ({s['reason']})"
        + (f", {s['cuda_graphs']} batch shapes as CUDA graphs" if s.get("cuda_graphs") else "")
        + f", ready in {s['startup_s']:.1f} s, peak RSS "
        f"{_f(s['peak_rss_mib'], 0)} MiB ({_f(s['startup_peak_rss_mib'], 0)} MiB after start-up;"
        " VmHWM summed over the server's processes)"
        + ("" if s["peak_rss_per_scenario"] else "; VmHWM could not be reset per scenario"),
        "",
        f"In-process ceilings: `{method}` at float32 and at the server's precision (tokenizes "
        "as it goes), and the model alone (pre-tokenized, length-sorted, padded batches already "
        "on the device; forward pass and "
        + ("pooling" if unit == "texts" else "the classifier's activation")
        + " only), each at its best batch size:",
        "",
        f"| ceiling | best batch | {unit}/s | by batch size | GFLOP/s | of matmul ceiling |"
        + (" one text, p50 |" if unit == "texts" else "")
        + (" GPU busy |" if cuda else ""),
        "|---|---:|---:|---|---:|---:|"
        + ("---:|" if unit == "texts" else "")
        + ("---:|" if cuda else ""),
    ]
    mm = results["matmul_gflops"]
    for name, c in part["ceiling"].items():
        sizes = ", ".join(f"{k}: {_f(v)}" for k, v in c["per_s_by_batch_size"].items())
        dtype = c.get("dtype", name)
        row = (
            f"| {_ceiling_label(name, c, method)} | {c['best_batch_size']} | {_f(c['per_s'])} "
            f"| {sizes} | {_f(c['gflops'], 0)} | {_pct(c['gflops'] / mm[dtype])} |"
        )
        if unit == "texts":
            row += f" {_f(c.get('single_text_p50_ms'), 1)} ms |"
        if cuda:
            row += f" {_pct(c.get('gpu_busy'))} |"
        out.append(row)
    names = list(part["ceiling"])
    out += [
        "",
        "Server over HTTP; ratios are the server's speed over each ceiling's (scenario 1: one "
        "in-process encode of one text, or the model alone's forward pass of one text, over "
        "the server's p50):",
        "",
        f"| scenario | requests | {unit}/s | requests/s | p50 / p99 ms | "
        + " | ".join("× model alone" if n == "model_alone" else f"× `{method}` {n}" for n in names)
        + f" | of {precision} matmul ceiling | mean forward batch |"
        + (" GPU busy |" if cuda else ""),
        "|---|---:|---:|---:|---:|"
        + "---:|" * len(names)
        + "---:|---:|"
        + ("---:|" if cuda else ""),
    ]
    for key, r in part["scenarios"].items():
        latency = f"{_f(r['p50_ms'], 1)} / {_f(r['p99_ms'], 1)}" if "p50_ms" in r else "–"
        requests = f"{r['requests']}" + (f" from {r['clients']} clients" if "clients" in r else "")
        ratios = r.get("ratios", {})
        per_unit = "–" if key == "0" else _f(r["per_s"])
        out.append(
            f"| {SCENARIO_LABELS.get(key, key)} | {requests} | {per_unit} | "
            f"{_f(r.get('requests_per_s', r['requests'] / r['wall_s']), 1)} | {latency} | "
            + " | ".join(
                (_f(ratios[f"vs_{n}"]) + "×") if f"vs_{n}" in ratios else "–" for n in names
            )
            + f" | {_pct(r.get('matmul_ceiling_fraction'))} | {_f(r.get('mean_batch_size'), 1)} |"
            + (f" {_pct(r.get('gpu_busy'))} |" if cuda else "")
        )
    out += [
        "",
        "Inside the server meanwhile (forward passes by batch size from /metrics; model busy = "
        "time in forward passes over wall time, from /info; CPU in cores, from /proc: the "
        "server's whole process tree (then its API process alone and the busiest other, "
        "mostly the engine), and this benchmark's process, which is the load "
        "generator; peak RSS: VmHWM summed over the server's processes):",
        "",
        "| scenario | forward passes by batch size | useful / padded tokens | model busy | "
        + ("passes on CUDA graphs | " if cuda else "")
        + "server CPU (processes) | client CPU (µs/request) | other load | peak RSS MiB | "
        + ("GPU memory MiB | " if cuda else "")
        + "output check |",
        "|---|---|---:|---:|"
        + ("---:|" if cuda else "")
        + "---:|---:|---:|---:|"
        + ("---:|" if cuda else "")
        + "---|",
    ]
    for key, r in part["scenarios"].items():
        check = "–"
        if "min_cosine_to_in_process" in r:
            check = f"cosine ≥ {r['min_cosine_to_in_process']:.5f}"
        elif "max_score_difference" in r:
            check = f"Δscore ≤ {r['max_score_difference']:.4f}"
        histogram = ", ".join(f"{k}: {v}" for k, v in r.get("batch_histogram", {}).items())
        processes = f" ({r['server_processes']})" if "server_processes" in r else ""
        if "api_cpu_cores" in r:
            processes += f": API {_f(r['api_cpu_cores'])}, next {_f(r['busiest_child_cpu_cores'])}"
        per_request = (
            f" ({_f(r['client_us_per_request'], 0)})" if "client_us_per_request" in r else ""
        )
        out.append(
            f"| {SCENARIO_LABELS.get(key, key)} | {histogram or '–'} | "
            f"{_pct(r.get('padding_efficiency'))} | {_pct(r.get('model_busy_fraction'))} | "
            + (f"{_pct(r.get('graph_fraction'))} | " if cuda else "")
            + f"{_f(r['server_cpu_cores'])}{processes} | "
            f"{_f(r['client_cpu_s'] / r['wall_s'])}{per_request} | {_f(r['other_load_cores'])} | "
            f"{_f(r['peak_rss_mib'], 0)} | "
            + (f"{_f(r.get('gpu_memory_mib'), 0)} | " if cuda else "")
            + f"{check} |"
        )
    out.append("")
    return out


def _load_note(results: dict[str, Any]) -> str:
    """Other processes' CPU use over the measured phases (ceilings and scenarios)."""
    phases = [
        (f"{name} {kind} {key}", m)
        for name in ("embeddings", "rerank")
        for kind in ("ceiling", "scenarios")
        for key, m in results.get(name, {}).get(kind, {}).items()
    ]
    wall = sum(m["wall_s"] for _, m in phases)
    if not wall:
        return "no measured phase"
    mean = sum(m["other_load_cores"] * m["wall_s"] for _, m in phases) / wall
    results["other_load_cores"] = mean
    noisy = [
        f"{label} ({m['other_load_cores']:.2f})"
        for label, m in phases
        if m["other_load_cores"] > 0.15
    ]
    note = (
        f"other processes used {mean:.2f} cores on average during the measured phases "
        "(/proc/stat minus the CPU time of the benchmark and of the server)"
    )
    if noisy:
        note += "; other work was running during " + ", ".join(noisy) + ": those figures are low"
    return note


def finish(results: dict[str, Any]) -> None:
    """Derived figures: fractions of the matmul ceiling, load note, targets, diagnostics."""
    precision = results["precision"]
    for part in ("embeddings", "rerank"):
        for s in results.get(part, {}).get("scenarios", {}).values():
            if "gflops" in s:
                s["matmul_ceiling_fraction"] = s["gflops"] / results["matmul_gflops"][precision]
    results["load_note"] = _load_note(results)
    results["targets"] = targets(results["shape"], results)
    results["targets_issue9"] = targets_issue9(results["shape"], results)
    results["diagnostics"] = diagnostics(results)


def main(argv: list[str] | None = None) -> None:
    """Render a results JSON again (``python -m bench.report bench/results/full-cpu.json``)."""
    for name in argv if argv is not None else sys.argv[1:]:
        path = Path(name)
        results = json.loads(path.read_text())
        finish(results)
        path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        path.with_suffix(".md").write_text(render(results))


if __name__ == "__main__":
    main()
