"""The Kubernetes manifests run the server with `readOnlyRootFilesystem: true`, the model
cache mounted read-only (HF_HUB_OFFLINE=1) and only a scratch directory writable. This
runs the real CLI that way: real model loading (tiny stand-ins through transformers and
huggingface_hub), warm-up, both APIs, and a clean SIGTERM, in a private mount namespace
where the whole root filesystem is read-only. Linux and root only (CI runs as root)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.live import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
set -eu
mount -t tmpfs -o size=64m tmpfs "$SCRATCH"
mount -o remount,bind,ro /
for path in / "$PWD" "$HF_HOME" "$HOME"; do
    if touch "$path/.write-probe" 2>/dev/null; then
        echo "$path is writable: the test would prove nothing" >&2
        exit 3
    fi
done
exec "$PYTHON" -m fake_openai_server
"""


def can_make_mount_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


@pytest.mark.skipif(not can_make_mount_namespaces(), reason="needs root and mount namespaces")
def test_server_runs_on_a_read_only_root_with_a_read_only_model_cache(
    hf_home: Path, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"  # the pod's writable /tmp (an emptyDir)
    scratch.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "SCRATCH": str(scratch),
        "TMPDIR": str(scratch),
        "PYTHON": sys.executable,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "SERVICE_TYPE": "all",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DTYPE": "float32",
    }
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "bash", "-c", SCRIPT],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, timeout=180, process=process)
        with httpx.Client(base_url=base_url, timeout=60) as client:
            embeddings = client.post("/v1/embeddings", json={"input": ["東京は日本の首都です"]})
            assert embeddings.status_code == 200, embeddings.text
            rerank = client.post("/v1/rerank", json={"query": "首都", "documents": ["東京", "青"]})
            assert rerank.status_code == 200, rerank.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text(errors="replace")
    assert "Read-only file system" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
