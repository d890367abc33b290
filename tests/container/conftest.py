"""Session fixtures for the container test: the built image and a model volume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.container import support
from tests.container.support import BuiltImage


@pytest.fixture(scope="session")
def container_tools() -> None:
    missing = [tool for tool in ("podman", "buildah") if shutil.which(tool) is None]
    if missing:
        support.unavailable(f"{', '.join(missing)} not installed ({support.APT_LINE})")
    probe = subprocess.run(["podman", "info"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        support.unavailable(f"podman does not work here: {probe.stderr.strip()[-500:]}")
    support.remove_stale_containers()


@pytest.fixture(scope="session")
def build_log() -> Path:
    log_dir = support.CACHE_DIR / "container-test"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "build.log"
    log.write_text("")
    return log


@pytest.fixture(scope="session")
def built_image(container_tools: None, build_log: Path) -> BuiltImage:
    """The project's Dockerfile built with podman (cached layers reused between runs)."""
    started = time.monotonic()
    base = support.ensure_base_image(build_log)
    base_seconds = time.monotonic() - started
    image_id = support.build_image(base, build_log)
    build_seconds = time.monotonic() - started - base_seconds
    info = support.inspect_image(image_id)
    # HEALTHCHECK lives in the Docker image config; podman shows it at the top level.
    healthcheck = (info.get("Healthcheck") or info["Config"].get("Healthcheck") or {}).get(
        "Test"
    ) or []
    timing = {"base_image_s": round(base_seconds, 1), "image_build_s": round(build_seconds, 1)}
    (build_log.parent / "timings.json").write_text(json.dumps(timing))
    print(f"\ncontainer test: {timing}", file=sys.stderr)
    return BuiltImage(id=image_id, config=info["Config"], healthcheck=list(healthcheck))


@pytest.fixture(scope="session")
def model_volume(tmp_path_factory: pytest.TempPathFactory, built_image: BuiltImage) -> Path:
    """A directory laid out like compose's ./volumes: <volume>/hf is the HF cache with
    tiny random-weight stand-ins under the real model names."""
    volume = tmp_path_factory.mktemp("volumes")
    volumes = list(built_image.config.get("Volumes") or {})
    assert len(volumes) == 1, f"the image should declare one data volume, not {volumes}"
    volume_target = volumes[0]
    hf_home = built_image.env["HF_HOME"]
    assert hf_home.startswith(volume_target + "/"), (hf_home, volume_target)
    cache = volume / hf_home.removeprefix(volume_target + "/")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.standins",
            "--hf-home",
            str(cache),
            "--size",
            "tiny",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The container runs as a non-root user: like ./volumes, the volume must be
    # writable by it.
    for path in [volume, *volume.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    return volume


@pytest.fixture(scope="session")
def standin_dim(model_volume: Path) -> int:
    (pooling,) = model_volume.rglob(
        "models--cl-nagoya--ruri-large/snapshots/*/1_Pooling/config.json"
    )
    return int(json.loads(pooling.read_text())["word_embedding_dimension"])
