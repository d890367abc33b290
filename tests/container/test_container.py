"""The real image: built from the project's Dockerfile with podman, each compose.yaml
service started from it as compose would (its environment, its port, the volume on
/data), with tiny stand-in models in the volume and HF_HUB_OFFLINE=1, and called over
HTTP on 127.0.0.1.

Cold (fresh machine): base image ~30 s, image build ~5-8 min (torch with its CUDA
libraries is ~3 GB of wheels). Warm (layers cached): ~1-2 min, most of it podman
checking the cached multi-GB layers. Each service run: ~10-20 s.

Needs podman, buildah and (for the base image, once) debootstrap; without them the
test is skipped, except under CI=true where it fails.
"""

from __future__ import annotations

import base64
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from fake_openai_server.settings import Settings
from tests.container import composefiles, support
from tests.container.support import BuiltImage
from tests.support.live import free_port

pytestmark = [pytest.mark.container, pytest.mark.timeout(3600)]

COMPOSE_SERVICES = composefiles.services(composefiles.COMPOSE)

DOCS = [
    "東京は日本の首都であり、政治と経済の中心地です。",
    "瑠璃色はサファイアのような深い青色のことを指します。",
    "返品をご希望の場合は、商品到着後七日以内にご連絡ください。",
]
QUERY = "日本の首都はどこですか"


def healthcheck_command(test: list[str]) -> list[str]:
    kind, *rest = test
    if kind == "CMD-SHELL":
        return ["/bin/sh", "-c", rest[0]]
    assert kind == "CMD", test
    return rest


def cache_mount(image: BuiltImage, volume: Path) -> dict[Path, str]:
    """The volume's HF cache bound at HF_HOME. (Compose binds ./volumes at /data, but
    `buildah run` lays its own copy of an image-declared VOLUME over a bind mount at
    that very path, so the test binds the directory inside it.)"""
    hf_home = image.env["HF_HOME"]
    (target,) = image.config["Volumes"]
    return {volume / hf_home.removeprefix(target + "/"): hf_home}


def data_volume(service: composefiles.Service) -> str:
    (target,) = [target for source, target in service.volumes if source.startswith(".")]
    return target


# --- the image itself ----------------------------------------------------------------------


def test_image_declares_what_compose_relies_on(built_image: BuiltImage) -> None:
    config = built_image.config
    assert "fake-openai-server" in built_image.command, built_image.command
    assert config.get("User") not in (None, "", "root", "0", "0:0"), "the image runs as root"
    # The healthcheck that compose declares is the image's own.
    assert built_image.healthcheck, "no HEALTHCHECK (build with --format docker)"
    for service in COMPOSE_SERVICES.values():
        assert service.raw["healthcheck"]["test"] == built_image.healthcheck, service.name
        assert data_volume(service) in (config.get("Volumes") or {}), service.name
        for port in service.container_ports:
            assert f"{port}/tcp" in (config.get("ExposedPorts") or {}), (service.name, port)
    assert built_image.env["HF_HOME"].startswith("/data/")


def test_runtime_image_has_no_build_tools_or_ca(built_image: BuiltImage) -> None:
    probe = (
        "import importlib.util, os, shutil, sys; "
        "tools = [t for t in ('uv', 'pip', 'pip3', 'gcc', 'cc', 'make') if shutil.which(t)]; "
        "pip = importlib.util.find_spec('pip') is not None; "
        "ca = [p for p in ('/tmp/ca-bundle.pem', '/run/secrets/ca') if os.path.exists(p)]; "
        "print(os.getuid(), tools, pip, ca); "
        "sys.exit(1 if os.getuid() == 0 or tools or pip or ca else 0)"
    )
    result = support.exec_in(built_image.id, {}, ["python", "-c", probe])
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_holds_the_server_and_no_test_tooling(built_image: BuiltImage) -> None:
    """The random-weight stand-ins and the fakes are development tools: not in the image."""
    probe = (
        "import importlib.util, sys; "
        "missing = [m for m in ('fake_openai_server.engine.worker', "
        "'fake_openai_server.backends.fast_tokenizers') if importlib.util.find_spec(m) is None]; "
        "tooling = [m for m in ('fake_openai_server.standins', 'tests', 'bench') "
        "if importlib.util.find_spec(m) is not None]; "
        "print(missing, tooling); sys.exit(1 if missing or tooling else 0)"
    )
    result = support.exec_in(built_image.id, {}, ["python", "-c", probe])
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_shot_preload_command(built_image: BuiltImage, model_volume: Path) -> None:
    """The documented `docker compose run --rm SERVICE python -m fake_openai_server.preload`
    (offline here, so it only finds the models already in the volume)."""
    env = {"SERVICE_TYPE": "all", "HF_HUB_OFFLINE": "1"}
    result = support.exec_in(
        built_image.id,
        env,
        ["python", "-m", "fake_openai_server.preload"],
        volumes=cache_mount(built_image, model_volume),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cl-nagoya/ruri-large" in result.stderr + result.stdout


# --- each compose service, run from the image ----------------------------------------------


@pytest.mark.parametrize("service_name", sorted(COMPOSE_SERVICES))
def test_compose_service_answers_over_http(
    service_name: str,
    built_image: BuiltImage,
    model_volume: Path,
    standin_dim: int,
    tmp_path: Path,
) -> None:
    service = COMPOSE_SERVICES[service_name]
    env = {**built_image.env, **service.environment, "HF_HUB_OFFLINE": "1"}
    (container_port,) = service.container_ports
    # The compose port as is when it is free here; otherwise the same service on
    # another port through PORT (host networking: no port mapping to lean on).
    port = container_port if support.port_free(container_port) else free_port("0.0.0.0")
    if port != container_port:
        env["PORT"] = str(port)
    overrides: dict[str, Any] = {k.lower(): v for k, v in service.environment.items()}
    settings = Settings(**overrides)
    assert settings.effective_port == container_port, "compose maps a port the server won't use"

    with support.serve(
        built_image.id,
        built_image.command,
        env,
        cache_mount(built_image, model_volume),
        port,
        tmp_path / "server.log",
        service_name,
    ) as server:
        ready_after = support.wait_ready(server)
        base = server.base_url
        print(f"\n{service_name}: ready after {ready_after:.1f}s on port {port}")

        status, body = support.http("GET", f"{base}/health")
        assert status == 200, body
        status, models = support.http("GET", f"{base}/v1/models")
        assert status == 200, models
        served = {m["id"] for m in models["data"]}

        if settings.serves_embeddings:
            (model,) = settings.embeddings_model
            assert model in served
            check_embeddings(base, model, standin_dim)
        if settings.serves_rerank:
            assert settings.reranker_model in served
            check_rerank(base, settings.reranker_model)

        # The image's HEALTHCHECK, run as Docker would (inside the container's
        # network, with its environment): healthy now, behind a corporate proxy too
        # (HTTP_PROXY, set for the models' download, had taken urllib's request to
        # 127.0.0.1 to the proxy: unhealthy for good) ...
        proxied = {**env, "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
        check = healthcheck_command(built_image.healthcheck)
        health = support.exec_in(built_image.id, proxied, check)
        assert health.returncode == 0, health.stdout + health.stderr
        assert server.alive(), server.log()

    # ... and unhealthy once the server is gone.
    health = support.exec_in(built_image.id, env, healthcheck_command(built_image.healthcheck))
    assert health.returncode != 0, "healthcheck passes with no server running"


def check_embeddings(base: str, model: str, dim: int) -> None:
    status, body = support.http(
        "POST", f"{base}/v1/embeddings", {"model": model, "input": DOCS[:2]}
    )
    assert status == 200, body
    assert body["object"] == "list"
    assert body["model"] == model
    assert [item["index"] for item in body["data"]] == [0, 1]
    vectors = [item["embedding"] for item in body["data"]]
    for vector in vectors:
        assert support.finite_floats(vector)
        assert len(vector) == dim
        assert any(v != 0 for v in vector)
    assert vectors[0] != vectors[1]
    assert body["usage"]["prompt_tokens"] > 0

    # base64 (what the openai client asks for by default) decodes to the same vector.
    status, encoded = support.http(
        "POST",
        f"{base}/v1/embeddings",
        {"model": model, "input": DOCS[0], "encoding_format": "base64"},
    )
    assert status == 200, encoded
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == dim
    dot = sum(a * b for a, b in zip(decoded, vectors[0], strict=True))
    norms = math.sqrt(sum(a * a for a in decoded)) * math.sqrt(sum(b * b for b in vectors[0]))
    assert dot / norms > 0.999


def check_rerank(base: str, model: str) -> None:
    status, body = support.http(
        "POST", f"{base}/v1/rerank", {"model": model, "query": QUERY, "documents": DOCS}
    )
    assert status == 200, body
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    scores = [r["relevance_score"] for r in results]
    assert all(0 < s < 1 for s in scores), scores
    assert scores == sorted(scores, reverse=True)

    status, top = support.http(
        "POST",
        f"{base}/v1/rerank",
        {"model": model, "query": QUERY, "documents": DOCS, "top_n": 2},
    )
    assert status == 200, top
    assert [r["index"] for r in top["results"]] == [r["index"] for r in results[:2]]
