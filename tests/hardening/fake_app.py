"""``python -m tests.hardening.fake_app SETTINGS_JSON DELAY``: the app over the fake
backends in a process of its own, so that a test can measure the server's memory."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from tests.support.live import LiveServer, free_port, run_server_process

ROOT = Path(__file__).resolve().parents[2]


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def fake_app_process(settings: dict[str, Any], delay: float) -> Iterator[LiveServer]:
    port = free_port()
    overrides = {**settings, "host": "127.0.0.1", "port": port}
    command = [sys.executable, "-m", "tests.hardening.fake_app", json.dumps(overrides), str(delay)]
    log_path = Path(tempfile.mkdtemp(prefix="fos-fake-")) / "server.log"
    with run_server_process(command, port, log_path, cwd=ROOT) as server:
        yield server


def main() -> None:
    from fake_openai_server.api.app import build_app
    from fake_openai_server.settings import Settings
    from tests.support.fakes import fake_plugin

    settings = Settings(**json.loads(sys.argv[1]))
    app = build_app(settings, fake_plugin(delay=float(sys.argv[2])))
    uvicorn.run(app, host=settings.host, port=settings.effective_port, log_level="warning")


if __name__ == "__main__":
    main()
