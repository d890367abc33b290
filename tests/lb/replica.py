"""The process a replica runs: ``tests.support.fake_app.serve`` with its output in a
log file. Imported once by the forkserver (see cluster.py), so that starting a replica
forks a process that has the app's modules loaded instead of importing them for ~5 s
on this 2-core machine; the replica is still a process of its own, signalled as one."""

from __future__ import annotations

import os
from typing import Any

# Imported here so that the forkserver loads them before it forks any replica.
import fake_openai_server.api.app
import fake_openai_server.cli
import tests.support.fakes
from tests.support.fake_app import serve

PRELOADED = (fake_openai_server.api.app, fake_openai_server.cli, tests.support.fakes)


def run(overrides: dict[str, Any], delay: float, load_seconds: float, log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    serve(overrides, delay, load_seconds)
