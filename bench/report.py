"""Verdicts against the targets of issue 3, diagnostics, and the markdown report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


# --- verdicts ---------------------------------------------------------------------------
def _target(name: str, wanted: str, measured: float, met: bool, unit: str = "x") -> dict[str, Any]:
    return {"target": name, "wanted": wanted, "measured": measured, "unit": unit, "met": met}


def targets(shape: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue 3 (stated for this 2-core CPU; on a GPU they are only a guide)."""
    if shape == "tiny":
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
    for key, label in (("2", "2: 32 one-text clients"), ("3", "3: one request of 256 texts")):
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
        if key in emb:
            size = emb[key]["mean_batch_size"]
            rows.append(
                _target(f"{key}: mean forward batch, {label}", "≥ 16", size, size >= 16, "texts")
            )
    rerank = results.get("rerank", {}).get("scenarios", {})
    if "4-concurrent" in rerank:
        ratio = rerank["4-concurrent"]["ratios"]["vs_float32"]
        rows.append(
            _target("4: rerank, 8 clients, vs float32 in-process", "≥ 2.0", ratio, ratio >= 2.0)
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


def diagnostics(results: dict[str, Any]) -> list[str]:
    """What limits each scenario, read off the meters."""
    cores = results["machine"]["cores"] or 1
    precision = results["precision"]
    lines = []
    emb = results.get("embeddings", {})
    one = emb.get("scenarios", {}).get("1")
    if one:
        in_process = emb["ceiling"][precision]["single_text_p50_ms"]
        forward = one["forward_ms_mean"]
        lines.append(
            f"scenario 1: p50 {one['p50_ms']:.1f} ms = forward pass {forward:.1f} ms "
            f"(mean, in the server) + {one['p50_ms'] - forward:.1f} ms outside the "
            f"model (HTTP, JSON, tokenization, thread hand-offs); in-process encode of one text "
            f"(tokenization included): {in_process:.1f} ms."
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
            idle = 1 - s["model_busy_fraction"]
            if idle > 0.1:
                lines.append(
                    f"{label}: the model was idle {idle:.0%} of the wall time (HTTP, tokenization, "
                    "batch forming or JSON in series with it, or too few requests waiting)."
                )
            if s["padding_efficiency"] and s["padding_efficiency"] < 0.85:
                lines.append(
                    f"{label}: padding took {1 - s['padding_efficiency']:.0%} of the tokens "
                    "computed."
                )
            if s["other_load_cores"] > 0.15:
                lines.append(
                    f"{label}: other processes used {s['other_load_cores']:.2f} of {cores} cores "
                    "meanwhile; the numbers understate the server."
                )
            if s["tokens"] != s["client_tokens"]:
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
                    "the server."
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
    return "–" if value is None else f"{100 * value:.0f}%"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    precision = results["precision"]
    mm = results["matmul_gflops"]
    out = [
        f"# Benchmark: {results['shape']} shape on {results['device']}",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}, run time {results['run_s'] / 60:.1f} min",
        "",
        f"- Machine: {m['cpu']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; {m['cores']} cores, {m['torch_threads']} torch threads, {m['memory_gib']} GiB;"
        f" native bfloat16: {m['native_bfloat16']}",
        f"- Software: Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}, sentence-transformers {m['sentence_transformers']}",
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
        "",
    ]
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
            f"({precision}) | server, best scenario |",
            "|---|---:|---:|---:|",
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
                best = max((s["per_s"] for s in part["scenarios"].values()), default=None)
                out.append(
                    f"| {label} | {_f(tok[key], 0)} {unit}/s | "
                    f"{_f(part['ceiling'][precision]['per_s'])} | {_f(best)} |"
                )
        out.append("")
    rows = results.get("targets", [])
    if rows:
        out += [
            "## Targets of issue 3",
            "",
            *(
                ["The targets were set for a 2-core CPU; on this device they are only a guide.", ""]
                if results["device"] != "cpu"
                else []
            ),
            "| target | wanted | measured | met |",
            "|---|---|---:|---|",
        ]
        for row in rows:
            value = (
                _pct(row["measured"])
                if row["unit"] == "%"
                else f"{_f(row['measured'])}{'×' if row['unit'] == 'x' else ' ' + row['unit']}"
            )
            met = "yes" if row["met"] else "**no**"
            out.append(f"| {row['target']} | {row['wanted']} | {value} | {met} |")
        out.append("")
    lines = results.get("diagnostics", [])
    if lines:
        out += ["## Diagnostics", ""] + [f"- {line}" for line in lines] + [""]
    return "\n".join(out)


SCENARIO_LABELS = {
    "1": "1 Dify indexing: 1 client, 1 text/request",
    "2": "2 many Dify users: 1 text/request",
    "2u": "2u the same, 300-char texts only",
    "3": "3 bulk: 1 request (base64)",
    "4-sequential": "4 rerank, 1 client",
    "4-concurrent": "4 rerank, concurrent clients",
}


def _render_part(
    part: dict[str, Any], unit: str, precision: str, results: dict[str, Any]
) -> list[str]:
    shape = part["shape"]
    title = "Embeddings" if unit == "texts" else "Rerank"
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
            "(the in-process ceiling, scenario 2, and scenario 3 repeats them to fill its "
            "request). Scenarios 1 and 2u: texts of 300 characters only"
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
            f"{'/'.join(map(str, p['chars']))} characters, mean {p['mean_tokens']:.0f} tokens, "
            f"{p['gflop_per_pair']:.1f} GFLOP per pair."
        )
    s = part["server"]
    out += [
        "",
        f"Server: dtype {s['dtype']} ({s['reason']}), ready in {s['startup_s']:.1f} s, peak RSS "
        f"{_f(s['peak_rss_mib'], 0)} MiB ({_f(s['startup_peak_rss_mib'], 0)} MiB after start-up)"
        + ("" if s["peak_rss_per_scenario"] else "; VmHWM could not be reset per scenario"),
        "",
        f"In-process ceiling (`{'encode' if unit == 'texts' else 'predict'}`, best batch size):",
        "",
        f"| precision | best batch | {unit}/s | by batch size | GFLOP/s | of matmul ceiling |"
        + (" one text, p50 |" if unit == "texts" else ""),
        "|---|---:|---:|---|---:|---:|" + ("---:|" if unit == "texts" else ""),
    ]
    mm = results["matmul_gflops"]
    for name, c in part["ceiling"].items():
        sizes = ", ".join(f"{k}: {_f(v)}" for k, v in c["per_s_by_batch_size"].items())
        row = (
            f"| {name} | {c['best_batch_size']} | {_f(c['per_s'])} | {sizes} "
            f"| {_f(c['gflops'], 0)} | {_pct(c['gflops'] / mm[name])} |"
        )
        if unit == "texts":
            row += f" {_f(c['single_text_p50_ms'], 1)} ms |"
        out.append(row)
    names = list(part["ceiling"])
    out += [
        "",
        "Server over HTTP; ratios are the server's speed over the in-process speed "
        "(scenario 1: over one in-process encode of one text):",
        "",
        f"| scenario | requests | {unit}/s | p50 / p99 ms | "
        + " | ".join(f"× {n} in-process" for n in names)
        + f" | of {precision} matmul ceiling | mean forward batch |",
        "|---|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    for key, r in part["scenarios"].items():
        latency = f"{_f(r['p50_ms'], 1)} / {_f(r['p99_ms'], 1)}" if "p50_ms" in r else "–"
        requests = f"{r['requests']}" + (f" from {r['clients']} clients" if "clients" in r else "")
        out.append(
            f"| {SCENARIO_LABELS[key]} | {requests} | {_f(r['per_s'])} | {latency} | "
            + " | ".join(_f(r["ratios"][f"vs_{n}"]) + "×" for n in names)
            + f" | {_pct(r['matmul_ceiling_fraction'])} | {_f(r['mean_batch_size'], 1)} |"
        )
    out += [
        "",
        "Inside the server meanwhile (forward passes by batch size from /metrics; model busy = "
        "time in forward passes over wall time; CPU in cores, from /proc):",
        "",
        "| scenario | forward passes by batch size | useful / padded tokens | model busy | "
        "server CPU | client CPU | other load | peak RSS MiB | output check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in part["scenarios"].items():
        check = "–"
        if "min_cosine_to_in_process" in r:
            check = f"cosine ≥ {r['min_cosine_to_in_process']:.5f}"
        elif "max_score_difference" in r:
            check = f"Δscore ≤ {r['max_score_difference']:.4f}"
        histogram = ", ".join(f"{k}: {v}" for k, v in r.get("batch_histogram", {}).items())
        out.append(
            f"| {SCENARIO_LABELS[key]} | {histogram or '–'} | {_pct(r['padding_efficiency'])} | "
            f"{_pct(r['model_busy_fraction'])} | {_f(r['server_cpu_cores'])} | "
            f"{_f(r['client_cpu_s'] / r['wall_s'])} | {_f(r['other_load_cores'])} | "
            f"{_f(r['peak_rss_mib'], 0)} | {check} |"
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
            s["matmul_ceiling_fraction"] = s["gflops"] / results["matmul_gflops"][precision]
    results["load_note"] = _load_note(results)
    results["targets"] = targets(results["shape"], results)
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
