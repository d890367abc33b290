"""The benchmark harness end to end on the tiny stand-ins: it measures and reports.

No performance assertions: this proves the harness works (servers start, every
scenario runs over HTTP, the engine's counters are read, the server's outputs
match the model's, the report is written), not how fast anything is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run


@pytest.mark.slow
def test_bench_runs_every_scenario_and_writes_its_report(hf_home: Path, tmp_path: Path) -> None:
    args = ["--shape", "tiny", "--device", "cpu", "--hf-home", str(hf_home), "--reuse"]
    results = run.main([*args, "--out", str(tmp_path)])

    written = json.loads((tmp_path / "tiny-cpu.json").read_text())
    assert written["command"] == "uv run python -m bench.run " + " ".join(
        [*args, "--out", str(tmp_path)]
    )
    assert written["shape"] == "tiny"
    assert written["machine"]["cores"] >= 1
    assert set(written["matmul_gflops"]) >= {"float32", results["precision"]}
    assert written["tokenizer"]["embeddings_texts_per_s"] > 0

    plan = run.plan_for("tiny", "cpu")
    emb = written["embeddings"]
    assert set(emb["ceiling"]) >= {"float32", results["precision"], "model_alone"}
    assert emb["ceiling"]["model_alone"]["per_s"] > 0
    assert emb["ceiling"]["model_alone"]["single_text_p50_ms"] > 0
    assert emb["server"]["dtype"] == results["precision"]  # the server ran at DTYPE=auto
    assert set(emb["scenarios"]) == {"0", "1", "2", "2-256", "2u", "3"}
    health = emb["scenarios"].pop("0")  # GET /health: no model work
    assert health["requests"] == plan.health_requests
    assert health["forward_batches"] == 0
    expected_texts = {
        "1": plan.sequential,
        "2": plan.corpus,
        "2-256": plan.many_requests,
        "2u": plan.uniform_requests,
        "3": plan.bulk,
    }
    for key, scenario in emb["scenarios"].items():
        assert scenario["texts"] == expected_texts[key]
        assert scenario["per_s"] > 0
        # /info differences: the server ran exactly the tokens the benchmark sent.
        assert scenario["tokens"] == scenario["client_tokens"]
        assert scenario["forward_batches"] >= 1
        assert sum(scenario["batch_histogram"].values()) == scenario["forward_batches"]
        assert scenario["peak_rss_mib"] > 0
        if key != "2u":  # 2u's texts are not run in-process
            assert scenario["min_cosine_to_in_process"] > 0.99
        assert {"vs_float32", f"vs_{results['precision']}", "vs_model_alone"} <= set(
            scenario["ratios"]
        )
        # CPU and peak RSS cover the server's process tree.
        assert scenario["server_processes"] >= 1
        assert scenario["server_cpu_cores"] > 0
    assert emb["scenarios"]["1"]["mean_batch_size"] == 1.0
    assert emb["scenarios"]["3"]["forward_batches"] < plan.bulk  # one request, batched

    assert emb["scenarios"]["2-256"]["clients"] == plan.many_clients

    rerank = written["rerank"]["scenarios"]
    assert set(rerank) == {"4-sequential", "4-concurrent"}
    assert rerank["4-concurrent"]["pairs"] == plan.rerank_concurrent * plan.documents
    assert rerank["4-concurrent"]["clients"] == plan.rerank_clients == 16
    assert "vs_model_alone" in rerank["4-concurrent"]["ratios"]
    for scenario in rerank.values():
        assert scenario["tokens"] == scenario["client_tokens"]
        assert scenario["max_score_difference"] < 0.05

    report = (tmp_path / "tiny-cpu.md").read_text()
    assert report.startswith("# Benchmark: tiny shape on cpu")
    for needle in (
        "In-process ceilings",
        "2 many Dify users",
        "2-256",
        "× model alone",
        "4 rerank, concurrent",
        "MeCab",
    ):
        assert needle in report


@pytest.mark.slow
def test_calls_per_request_counts_the_api_process(hf_home: Path, tmp_path: Path) -> None:
    """bench.calls profiles the real server twice and reports the difference per request."""
    from bench import calls

    args = ["--shape", "tiny", "--hf-home", str(hf_home), "--reuse", "--requests", "100"]
    results = calls.main([*args, "--out", str(tmp_path), "--tag", "t"])

    # A one-text request runs a few hundred Python calls through uvicorn, the server's
    # middleware and its own layers (~375 measured over thousands of requests). The
    # start-up's tens of thousands cancel out only roughly: the background's calls (the
    # readiness polls, the loop-lag timer) grow with how long each start-up took, and on
    # a loaded machine the net total over a hundred requests once came out at -26. The
    # functions each request runs are counted per function, and hold.
    assert results["calls_per_request"] < 10_000
    packages = results["by_package"]
    assert {"fastapi", "starlette", "fake_openai_server/api", "fake_openai_server/service"} <= set(
        packages
    )
    assert packages["fake_openai_server/api"] >= 10, packages  # ~46 a request
    assert packages["fake_openai_server/service"] >= 5, packages  # ~27
    report = (tmp_path / "calls-t.md").read_text()
    assert f"{results['calls_per_request']:,.0f} Python function calls per request" in report


@pytest.mark.slow
def test_ab_runs_both_sides_in_alternating_rounds(hf_home: Path, tmp_path: Path) -> None:
    """bench.ab starts A (from --server-src) and B (here two servers, the clients spread
    over them) at once and runs the one-text scenarios on each in turn."""
    from bench import ab

    root = Path(__file__).resolve().parents[2]
    args = ["--shape", "tiny", "--hf-home", str(hf_home), "--reuse", "--server-src", str(root)]
    args += ["--b-replicas", "2", "--scenarios", "2", "--rounds", "2"]
    results = ab.main([*args, "--out", str(tmp_path), "--tag", "t"])

    plan = ab.plan_for("tiny", "cpu")
    rounds = results["rounds"]
    assert [r["order"] for r in rounds] == ["AB", "BA"]  # who goes first swaps
    assert set(results["b_over_a"]) == {"2", "2-256", "2u"}
    for done in rounds:
        assert done["min_cosine_b_to_a"] > 0.99  # same tree, same vectors
        for key, texts in (("2", plan.corpus), ("2-256", plan.many_requests)):
            a, b = done["A"][key], done["B"][key]
            assert a["texts"] == b["texts"] == texts
            assert b["per_s"] > 0 and b["p50_ms"] > 0
            # B pooled two servers' engines: every text ran in one of their batches.
            assert b["mean_batch_size"] >= 1 and b["api_cpu_cores"] >= 0
        # /proc counts CPU in 10 ms ticks: one tiny scenario can read 0 (it did, in CI),
        # a round's scenarios together cannot.
        assert sum(done["B"][key]["api_cpu_cores"] for key in ("2", "2-256", "2u")) > 0
    report = (tmp_path / "ab-tiny-cpu-t.md").read_text()
    assert "B: 2 servers of this tree" in report
    assert "| 2-256 | 2 | B |" in report


@pytest.mark.slow
def test_ab_emulates_the_gpu_hosts_timing_over_the_fake_models(tmp_path: Path) -> None:
    """bench.ab --emulate-gpu serves both trees over the fake models with the H200's
    timing (no stand-ins to build) and reports each against the emulated model alone;
    scenario 5 sends one-text requests while a bulk job runs beside them. ``--b-env``
    sets B apart (this tree on both sides): the A/B of a setting."""
    from bench import ab
    from bench.workload import EMULATED_H200

    args = ["--shape", "tiny", "--emulate-gpu", "--b-env", "MAX_BATCH_SIZE=2"]
    args += ["--scenarios", "3", "5"]
    results = ab.main([*args, "--rounds", "1", "--out", str(tmp_path), "--tag", "t"])

    done = results["rounds"][0]
    plan = ab.plan_for("tiny", "cpu")
    assert done["A"]["3"]["texts"] == done["B"]["3"]["texts"] == plan.bulk * plan.bulk_repeats
    assert done["min_cosine_b_to_a"] > 0.99
    # The engine ran the fake models, B's at its own batch limit, A's at the default.
    assert 1 <= done["B"]["3"]["mean_batch_size"] <= 2 < done["A"]["3"]["mean_batch_size"]
    beside = done["B"]["5"]
    assert beside["requests"] == plan.corpus and beside["bulk_requests"] >= 1
    assert beside["texts"] == plan.corpus + beside["bulk_requests"] * plan.bulk
    assert 0 < beside["p50_ms"] <= beside["p90_ms"] <= beside["p99_ms"]
    assert results["emulated_gpu"]["settings"]["TOKENIZER_WORKERS"] == "8"
    assert results["emulated_gpu"]["device_alone"] == EMULATED_H200.device_alone
    report = (tmp_path / "ab-tiny-emulated-gpu-t.md").read_text()
    assert report.startswith("# A/B: tiny shape on an emulated GPU")
    assert "- B's own settings, over those: {'MAX_BATCH_SIZE': '2'}" in report
    assert "Median texts/s over the emulated model alone:" in report
    assert "Scenario 5, the chat users' one-text requests beside the bulk job" in report
