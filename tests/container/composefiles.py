"""What the compose files and the Dockerfile declare, read the way Docker reads them."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
COMPOSE_LEGACY = ROOT / "compose-legacy.yaml"
COMPOSE_MULTI_GPU = ROOT / "compose.multi-gpu.yaml"
DOCKERFILE = ROOT / "Dockerfile"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
# Each shipped compose file and the override that runs it on a host without a GPU.
CPU_OVERRIDES = {
    COMPOSE: ROOT / "compose.cpu.yaml",
    COMPOSE_LEGACY: ROOT / "compose-legacy.cpu.yaml",
    COMPOSE_MULTI_GPU: ROOT / "compose.multi-gpu.cpu.yaml",
}


class _ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it: ``!reset`` and ``!override`` (merge directives for
    override files) are read as the plain value they carry."""


def _plain(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    assert isinstance(node, yaml.ScalarNode)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _plain)


def load(path: Path) -> dict[str, Any]:
    """The compose file with YAML anchors and merge keys (``<<``) resolved."""
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ComposeLoader)  # a SafeLoader
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def reset_keys(path: Path) -> dict[str, set[str]]:
    """Service name -> the keys an override file resets with ``!reset``."""
    root = yaml.compose(path.read_text(encoding="utf-8"), Loader=_ComposeLoader)
    assert isinstance(root, yaml.MappingNode)
    out: dict[str, set[str]] = {}
    for key, value in root.value:
        if key.value != "services":
            continue
        for name, service in value.value:
            out[name.value] = {k.value for k, v in service.value if v.tag == "!reset"}
    return out


@dataclass(frozen=True)
class Service:
    name: str
    image: str | None
    environment: dict[str, str]
    ports: list[tuple[int, int]]  # (host, container)
    volumes: list[tuple[str, str]]  # (source, target)
    raw: dict[str, Any]

    @property
    def service_type(self) -> str:
        return self.environment.get("SERVICE_TYPE", "embeddings")

    @property
    def container_ports(self) -> list[int]:
        return [container for _, container in self.ports]


def _environment(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): "" if v is None else str(v) for k, v in value.items()}
    assert isinstance(value, list)
    pairs = (str(item).split("=", 1) for item in value)
    return {p[0]: p[1] if len(p) > 1 else "" for p in pairs}


def _ports(value: Iterable[object] | None) -> list[tuple[int, int]]:
    out = []
    for item in value or []:
        if isinstance(item, dict):
            target = int(item["target"])
            out.append((int(item.get("published") or target), target))
            continue
        spec = str(item).split("/", 1)[0]
        parts = spec.split(":")
        container = int(parts[-1])
        host = int(parts[-2]) if len(parts) >= 2 else container
        out.append((host, container))
    return out


def _volumes(value: Iterable[object] | None) -> list[tuple[str, str]]:
    out = []
    for item in value or []:
        if isinstance(item, dict):
            out.append((str(item.get("source", "")), str(item["target"])))
        else:
            source, target = str(item).split(":")[:2]
            out.append((source, target))
    return out


def services(path: Path) -> dict[str, Service]:
    data = load(path)
    return {
        name: Service(
            name=name,
            image=spec.get("image"),
            environment=_environment(spec.get("environment")),
            ports=_ports(spec.get("ports")),
            volumes=_volumes(spec.get("volumes")),
            raw=spec,
        )
        for name, spec in data["services"].items()
    }


# --- the Dockerfile (final stage), for the static checks ---------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    instructions = [(ln.split(None, 1)[0].upper(), (ln.split(None, 1) + [""])[1]) for ln in lines]
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def dockerfile_healthcheck() -> list[str]:
    """The HEALTHCHECK's test as Docker stores it: ["CMD", ...]."""
    for op, args in dockerfile_instructions():
        if op == "HEALTHCHECK":
            command = re.split(r"\s+CMD\s+", args, maxsplit=1)[1].strip()
            if command.startswith("["):
                return ["CMD", *json.loads(command)]
            return ["CMD-SHELL", command]
    raise AssertionError("the Dockerfile has no HEALTHCHECK")


def dockerfile_values(instruction: str) -> list[str]:
    """Arguments of every ``instruction`` (e.g. EXPOSE, VOLUME) in the final stage."""
    values: list[str] = []
    for op, args in dockerfile_instructions():
        if op == instruction:
            args = args.strip()
            values += json.loads(args) if args.startswith("[") else shlex.split(args)
    return values
