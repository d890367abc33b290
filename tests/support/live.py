"""Real servers on real sockets: uvicorn in a thread, or the CLI in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

READY_TIMEOUT = 240.0


@dataclass
class LiveServer:
    base_url: str
    app: FastAPI | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(base_url: str, timeout: float = READY_TIMEOUT, process: object = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:  # type: ignore[attr-defined]
            raise RuntimeError(f"server exited early with code {process.returncode}")  # type: ignore[attr-defined]
        try:
            response = httpx.get(f"{base_url}/ready", timeout=5)
            if response.status_code == 200:
                return
            last = response.text
            if response.json().get("status") == "failed":
                raise RuntimeError(f"{base_url}: model loading failed")
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{base_url} not ready after {timeout}s: {last}")


@contextlib.contextmanager
def serve_app(app: FastAPI, wait: bool = True) -> Iterator[LiveServer]:
    """Run ``app`` under a real uvicorn on 127.0.0.1 in a background thread."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    if wait:
        wait_ready(base_url)
    try:
        yield LiveServer(base_url, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def run_server_process(
    command: list[str],
    port: int,
    log_path: Path,
    env: dict[str, str] | None = None,
    wait: bool = True,
    **popen: Any,
) -> Iterator[LiveServer]:
    """Run a server ``command`` listening on ``port``; stop it (SIGTERM, then kill) after."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, **popen)
    server = LiveServer(f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        if wait:
            wait_ready(server.base_url, process=process)
        yield server
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def run_cli(
    env: dict[str, str], log_dir: Path, args: list[str] | None = None, wait: bool = True
) -> Iterator[LiveServer]:
    """Run ``python -m fake_openai_server`` as users do, in a subprocess."""
    port = free_port()
    full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), **env}
    command = [sys.executable, "-m", "fake_openai_server", *(args or [])]
    with run_server_process(
        command, port, log_dir / f"server-{port}.log", full_env, wait
    ) as server:
        yield server


@contextlib.contextmanager
def fake_cli(
    settings: dict[str, Any], options: dict[str, Any], log_dir: Path, wait: bool = True
) -> Iterator[LiveServer]:
    """The CLI's serving path (``cli.serve``) over the fake models, in a subprocess."""
    port = free_port()
    overrides = {**settings, "host": "127.0.0.1", "port": port}
    command = [
        sys.executable,
        "-m",
        "tests.support.fake_cli",
        json.dumps(overrides),
        json.dumps(options),
    ]
    root = Path(__file__).resolve().parents[2]
    log_path = log_dir / f"fake-cli-{port}.log"
    with run_server_process(command, port, log_path, wait=wait, cwd=root) as server:
        yield server
