"""Real servers on real sockets, and the one harness every test and the benchmark use.

- ``free_port`` and ``wait_ready``: a port to listen on, and polling ``/ready``;
- ``LiveServer``: the handle to a running server (uvicorn in a thread of this process, a
  subprocess, or a container: the container test and the benchmark extend it), with a raw
  socket to it for what httpx will not send;
- ``metric``: one counter or gauge of a server's ``/metrics``;
- ``serve_app``, ``run_server_process``, ``run_cli`` and ``fake_cli``: ways to start one.
"""

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
from prometheus_client.parser import text_string_to_metric_families

from fake_openai_server.cli import uvicorn_config
from fake_openai_server.settings import Settings

READY_TIMEOUT = 240.0
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveServer:
    """A server reachable at ``base_url``: ``app`` when it runs in this process,
    ``process`` (with its output in ``log_path``) when it runs in another."""

    base_url: str
    app: FastAPI | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kwargs)

    @property
    def address(self) -> tuple[str, int]:
        """The host and port ``base_url`` names."""
        host, port = self.base_url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def connect(self, timeout: float = 10) -> socket.socket:
        """A raw TCP connection to the server, for bytes no HTTP client would send."""
        return socket.create_connection(self.address, timeout=timeout)

    def metric(self, name: str, *, headers: dict[str, str] | None = None, **labels: str) -> float:
        return metric(self.base_url, name, headers=headers, **labels)

    def log(self, lines: int | None = None) -> str:
        """The server's output: all of it, or its last ``lines`` lines ("" when none)."""
        return log_tail(self.log_path, lines)

    def alive(self) -> bool:
        """Whether the server's process is still running (always, in this process)."""
        return self.process is None or self.process.poll() is None

    @property
    def pid(self) -> int:
        """The server's process: this one for an app served in a thread."""
        return os.getpid() if self.process is None else self.process.pid


def metric(
    base_url: str, name: str, *, headers: dict[str, str] | None = None, **labels: str
) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` in the server's
    ``/metrics`` (Prometheus text; ``headers``: an API key, where one is needed); 0 when
    there are none."""
    reply = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10, trust_env=False)
    reply.raise_for_status()
    text = reply.text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def log_tail(path: Path | None, lines: int | None = None) -> str:
    """The last ``lines`` lines of ``path`` (all of it when None); "" when unreadable."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text if lines is None else "\n".join(text.splitlines()[-lines:])


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` (0.0.0.0 for a server on every interface)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_ready(
    base_url: str,
    timeout: float = READY_TIMEOUT,
    process: subprocess.Popen[Any] | None = None,
    log_path: Path | None = None,
    *,
    interval: float = 0.2,
) -> float:
    """Poll ``{base_url}/ready`` every ``interval`` seconds until it answers 200; returns
    the seconds that took.

    Fails early when ``process`` exits (RuntimeError) or /ready says that loading failed
    (RuntimeError), else after ``timeout`` seconds (TimeoutError); the message then ends
    with the last lines of ``log_path`` when given. Loopback only: never through a proxy
    from the environment.
    """
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"server exited early with code {process.returncode}{_log_lines(log_path)}"
            )
        try:
            response = httpx.get(f"{base_url}/ready", timeout=5, trust_env=False)
        except httpx.HTTPError as exc:
            last = repr(exc)
        else:
            if response.status_code == 200:
                return time.monotonic() - start
            last = f"{response.status_code} {response.text}"
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and body.get("status") == "failed":
                raise RuntimeError(f"{base_url}: model loading failed{_log_lines(log_path)}")
        time.sleep(interval)
    raise TimeoutError(f"{base_url} not ready after {timeout:g}s: {last}{_log_lines(log_path)}")


def _log_lines(log_path: Path | None, lines: int = 80) -> str:
    return f"\n{log_tail(log_path, lines)}" if log_path is not None else ""


@contextlib.contextmanager
def serve_app(app: FastAPI, wait: bool = True, **config: Any) -> Iterator[LiveServer]:
    """Run ``app`` under a real uvicorn on 127.0.0.1 in a background thread (``config``:
    more of uvicorn's options, as its command line would give them)."""
    port = free_port()
    # Served as the CLI serves it (keep-alive, read deadline): for the app's own settings,
    # or the defaults for an app built without them.
    settings = getattr(app.state, "settings", None) or Settings.model_construct()
    server = uvicorn.Server(
        uvicorn_config(app, settings, host="127.0.0.1", port=port, log_level="warning", **config)
    )
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
            wait_ready(server.base_url, process=process, log_path=log_path)
        yield server
    except Exception:
        # A test that failed while the server ran shows what the server said meanwhile.
        print(f"--- last lines of {log_path.name} ---\n{server.log(60)}", file=sys.stderr)
        raise
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
    log_path = log_dir / f"fake-cli-{port}.log"
    with run_server_process(command, port, log_path, wait=wait, cwd=ROOT) as server:
        yield server
