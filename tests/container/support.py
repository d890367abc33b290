"""Podman/buildah plumbing for the container test (no Docker engine needed).

How the image is built and run here (see ../shared/docs/containers-here.md):

- base image: ``debootstrap --variant=minbase bookworm`` imported as
  ``localhost/debian:bookworm`` (no registry is reachable), passed as BASE_IMAGE;
- build: ``podman build --isolation chroot --network host --format docker``
  (``--format docker`` keeps the HEALTHCHECK, which OCI images cannot carry);
- run: ``buildah from`` + ``buildah run --isolation chroot --network host`` with the
  image's own Cmd/Entrypoint/Env read from ``podman image inspect``, since
  ``podman run`` cannot set rlimits on these machines.

Both the base image and podman's layer cache are kept between runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.live import LiveServer, log_tail
from tests.support.live import wait_ready as wait_until_ready

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fake-openai-server"

BASE_IMAGE = os.environ.get("CONTAINER_TEST_BASE_IMAGE", "localhost/debian:bookworm")
IMAGE_TAG = "localhost/fake-openai-server:container-test"
# The `project` build stage, tagged so that its parent (the dependency layers) is
# never dangling: old builds can then be removed by id without losing the cache.
STAGE_TAG = "localhost/fake-openai-server:container-test-project-stage"
CONTAINER_PREFIX = "fos-ctest-"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")

APT_LINE = "apt-get update && apt-get install -y podman buildah debootstrap"


def unavailable(reason: str) -> None:
    """Skip on a developer machine; fail in CI, where the container test must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"container test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def run(
    args: list[str], *, log: Path | None = None, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command; output goes to ``log`` (appended) or is captured."""
    if log is None:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
        output = result.stdout + result.stderr
    else:
        with log.open("a") as out:
            out.write(f"\n$ {' '.join(args)}\n")
            out.flush()
            result = subprocess.run(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                check=False,
            )
        output = log_tail(log, 60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args[:3])} ... exited {result.returncode}:\n{output}")
    return result


# --- images ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    id: str
    config: dict[str, Any]  # podman image inspect → Config (Cmd, Entrypoint, Env, ...)
    healthcheck: list[str]  # Config.Healthcheck.Test, e.g. ["CMD", "python", "-c", ...]

    @property
    def env(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in self.config.get("Env") or [])
        return {key: value for key, value in pairs}

    @property
    def command(self) -> list[str]:
        """What `docker run IMAGE` runs: Entrypoint followed by Cmd."""
        return [*(self.config.get("Entrypoint") or []), *(self.config.get("Cmd") or [])]


def image_id(ref: str) -> str | None:
    result = run(["podman", "image", "inspect", "--format", "{{.Id}}", ref], check=False)
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def inspect_image(ref: str) -> dict[str, Any]:
    out = run(["podman", "image", "inspect", ref]).stdout
    data = json.loads(out)
    image: dict[str, Any] = data[0] if isinstance(data, list) else data
    return image


def ensure_base_image(log: Path) -> str:
    """``localhost/debian:bookworm`` from debootstrap, reused when it already exists."""
    if image_id(BASE_IMAGE):
        return BASE_IMAGE
    if BASE_IMAGE != "localhost/debian:bookworm":
        unavailable(f"base image {BASE_IMAGE} (CONTAINER_TEST_BASE_IMAGE) is not present")
    if shutil.which("debootstrap") is None:
        unavailable(f"debootstrap is not installed ({APT_LINE})")
    if os.geteuid() != 0:
        unavailable("debootstrap needs root to create the base image")
    with tempfile.TemporaryDirectory(prefix="fos-bookworm-") as rootfs:
        run(
            ["debootstrap", "--variant=minbase", "bookworm", rootfs, DEBIAN_MIRROR],
            log=log,
            timeout=1200,
        )
        # Like debian:bookworm-slim: no downloaded packages or package lists.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (Path(rootfs) / junk).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        try:
            run_with_stdin(["podman", "import", "-", BASE_IMAGE], tar, log)
        finally:
            tar.wait(timeout=600)
    assert image_id(BASE_IMAGE), f"importing {BASE_IMAGE} failed:\n{log_tail(log, 60)}"
    return BASE_IMAGE


def run_with_stdin(args: list[str], source: subprocess.Popen[bytes], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        result = subprocess.run(
            args,
            stdin=source.stdout,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=False,
        )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{log_tail(log, 60)}")


def build_image(base: str, log: Path) -> str:
    """Build the project's Dockerfile; returns the image id. Old builds are removed."""
    old = {tag: image_id(tag) for tag in (STAGE_TAG, IMAGE_TAG)}
    command = [
        "podman",
        "build",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--format",
        "docker",
        "--layers",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "-f",
        str(ROOT / "Dockerfile"),
    ]
    ca = os.environ.get("SSL_CERT_FILE")
    if ca and Path(ca).is_file():
        command += ["--secret", f"id=ca,src={ca}"]
    run([*command, "--target", "project", "-t", STAGE_TAG, str(ROOT)], log=log, timeout=3000)
    run([*command, "-t", IMAGE_TAG, str(ROOT)], log=log, timeout=3000)
    new = image_id(IMAGE_TAG)
    assert new, f"podman build produced no {IMAGE_TAG}:\n{log_tail(log, 60)}"
    for tag, previous in old.items():
        if previous and previous != image_id(tag):
            run(["podman", "rmi", previous], log=log, check=False)
    return new


# --- running -----------------------------------------------------------------------------


def remove_stale_containers() -> None:
    """Containers left by an earlier, interrupted run of this test (by name prefix)."""
    result = run(["buildah", "containers", "--format", "{{.ContainerName}}"], check=False)
    for name in result.stdout.split():
        if name.startswith(CONTAINER_PREFIX):
            run(["buildah", "rm", name], check=False)


@contextlib.contextmanager
def container(image: str, label: str) -> Iterator[str]:
    """A buildah working container from ``image``; always removed afterwards."""
    name = f"{CONTAINER_PREFIX}{label}-{uuid.uuid4().hex[:8]}"
    run(["buildah", "from", "--name", name, image])
    try:
        yield name
    finally:
        run(["buildah", "rm", name], check=False)


def run_args(
    name: str, env: Mapping[str, str], volumes: Mapping[Path, str], command: list[str]
) -> list[str]:
    args = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    for host, target in volumes.items():
        args += ["-v", f"{host}:{target}"]
    return [*args, name, "--", *command]


def exec_in(
    image: str,
    env: Mapping[str, str],
    command: list[str],
    timeout: float = 120,
    volumes: Mapping[Path, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a one-shot command in a fresh container of ``image`` (like ``docker run --rm``)."""
    with container(image, "exec") as name:
        return run(run_args(name, env, volumes or {}, command), timeout=timeout, check=False)


@dataclass
class Server(LiveServer):
    """The image's own command running in a container, reachable on 127.0.0.1."""

    env: dict[str, str] = field(default_factory=dict)

    def log(self, lines: int | None = 80) -> str:
        return super().log(lines)


@contextlib.contextmanager
def serve(
    image: str,
    command: list[str],
    env: Mapping[str, str],
    volumes: Mapping[Path, str],
    port: int,
    log_path: Path,
    label: str,
) -> Iterator[Server]:
    with container(image, label) as name:
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                run_args(name, env, volumes, command),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        server = Server(
            f"http://127.0.0.1:{port}", process=process, log_path=log_path, env=dict(env)
        )
        try:
            yield server
        finally:
            stop(process)
            wait_closed(port)


def stop(process: subprocess.Popen[bytes]) -> None:
    """End the buildah process group this test started (buildah kills the container's)."""
    if process.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def wait_closed(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.5)


# --- HTTP --------------------------------------------------------------------------------

# Loopback only: never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, body: object = None, timeout: float = 60) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=timeout) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_ready(server: Server, timeout: float = 300) -> float:
    """Poll /ready until 200 (returns the seconds it took); fails early if the
    container's process exits. Failures are assertion failures of the test."""
    try:
        return wait_until_ready(
            server.base_url, timeout, server.process, server.log_path, interval=0.5
        )
    except (RuntimeError, TimeoutError) as exc:
        raise AssertionError(str(exc)) from None


def finite_floats(values: object) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, float | int) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )
