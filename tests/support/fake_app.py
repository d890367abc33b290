"""``python -m tests.support.fake_app SETTINGS_JSON DELAY [LOAD_SECONDS]``: the app over
the fake backends in a process of its own, served as the CLI serves it (so SIGTERM drains
as in production), so that a test can measure the server's memory or stop it.

LOAD_SECONDS makes model loading take that long (``/ready`` says 503 meanwhile)."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.live import ROOT, LiveServer, free_port, run_server_process


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
    command = [sys.executable, "-m", "tests.support.fake_app", json.dumps(overrides), str(delay)]
    log_path = Path(tempfile.mkdtemp(prefix="fos-fake-")) / "server.log"
    with run_server_process(command, port, log_path, cwd=ROOT) as server:
        yield server


def serve(overrides: dict[str, Any], delay: float, load_seconds: float = 0.0) -> None:
    """Serve the app over the fakes until SIGTERM (a drain, as the CLI does) or SIGINT."""
    from fake_openai_server import logs
    from fake_openai_server.api.app import build_app
    from fake_openai_server.cli import Server, uvicorn_config
    from fake_openai_server.settings import Settings
    from tests.support.fakes import fake_plugin

    settings = Settings(**overrides)
    logs.configure(settings.log_level, settings.log_json)
    app = build_app(settings, fake_plugin(delay=delay, load_seconds=load_seconds))
    # As cli.main() serves: same logging and uvicorn settings, exit 0 after a clean drain.
    config = uvicorn_config(app, settings)
    Server(config).run()


def main() -> None:
    load_seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    serve(json.loads(sys.argv[1]), float(sys.argv[2]), load_seconds)


if __name__ == "__main__":
    main()
