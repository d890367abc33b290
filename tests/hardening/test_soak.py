"""A few seconds of bench/soak.py against the fake server: the script keeps working.

The real soak (minutes to hours, against a real model) is run by hand; see its docstring.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support.fake_app import fake_app_process

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_soak_script_runs_and_reports() -> None:
    settings = {"service_type": "all", "warmup": False, "api_keys": ["sk-soak"]}
    with fake_app_process(settings, delay=0.002) as server:
        done = subprocess.run(
            [
                sys.executable,
                str(SOAK),
                f"--url={server.base_url}",
                "--seconds=4",
                "--concurrency=4",
                "--report-every=2",
                "--api-key=sk-soak",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "verdict: ok" in out
    assert "UNEXPECTED" not in out
    for kind, status in (("embeddings", 200), ("rerank", 200), ("embeddings", 400)):
        assert re.search(rf"^  {kind} +{status} +[1-9]", out, re.MULTILINE), out
    # The memory of each kind of process: the API's, the engine's (the model), and the
    # tokenizers' (none here).
    summary = out.split("  RSS MiB: start ")[1].splitlines()[0]
    assert re.fullmatch(
        r"(API [\d.]+, engine [\d.]+, tokenizers 0\.0; (after warm-up|end) ){2}"
        r"API [\d.]+, engine [\d.]+, tokenizers 0\.0; "
        r"growth after warm-up API -?[\d.]+, engine -?[\d.]+, tokenizers 0\.0",
        summary,
    ), summary


def test_soak_script_refuses_anything_but_loopback() -> None:
    done = subprocess.run(
        [sys.executable, str(SOAK), "--url=http://192.0.2.1:8080", "--seconds=1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "loopback" in done.stderr
