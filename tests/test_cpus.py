"""The cores a container's CPU limit leaves: read from control-group files laid out as
the kernel writes them (cgroup v1 and v2, Docker's and Kubernetes' layouts), and, where
this machine lets a test make a control group, from the kernel itself."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fake_openai_server.cpus import cpu_limit, usable_cores

# Docker on cgroup v2 (a cgroup namespace: the container's group is the mount's root).
V2_CONTAINER = {
    "proc/self/cgroup": "0::/\n",
    "proc/self/mountinfo": (
        "25 30 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw\n"
    ),
}
# A Kubernetes pod on cgroup v2 seen from the host's namespace: the pod's group and the
# container's below it each carry a limit.
V2_POD = {
    "proc/self/cgroup": "0::/kubepods.slice/pod1.slice/cri-abc.scope\n",
    "proc/self/mountinfo": "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n",
}
# Docker on cgroup v1 without a cgroup namespace: the mount shows the container's group.
V1_DOCKER = {
    "proc/self/cgroup": "12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/system.slice\n",
    "proc/self/mountinfo": (
        "40 31 0:37 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup "
        "rw,cpu,cpuacct\n"
        "41 31 0:38 /docker/abc /sys/fs/cgroup/pids ro,nosuid - cgroup cgroup rw,pids\n"
    ),
}


def lay_out(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(("cpu_max", "cores"), [("150000 100000\n", 1.5), ("max 100000\n", None)])
def test_v2_container(tmp_path: Path, cpu_max: str, cores: float | None) -> None:
    root = lay_out(tmp_path, {**V2_CONTAINER, "sys/fs/cgroup/cpu.max": cpu_max})
    assert cpu_limit(root) == cores


def test_v2_the_lowest_limit_above_the_group_counts(tmp_path: Path) -> None:
    pod = "sys/fs/cgroup/kubepods.slice/pod1.slice"
    root = lay_out(
        tmp_path,
        {
            **V2_POD,
            "sys/fs/cgroup/kubepods.slice/cpu.max": "max 100000\n",
            f"{pod}/cpu.max": "300000 100000\n",  # the pod: 3 cores
            f"{pod}/cri-abc.scope/cpu.max": "400000 100000\n",  # the container: 4
        },
    )
    assert cpu_limit(root) == 3.0
    assert usable_cores(root) == min(3, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize(
    ("quota", "limit", "cores"),
    [("50000\n", 0.5, 1), ("-1\n", None, None)],  # half a core is still a core to run on
    ids=["half-a-core", "no-quota"],
)
def test_v1_docker(tmp_path: Path, quota: str, limit: float | None, cores: int | None) -> None:
    group = "sys/fs/cgroup/cpu,cpuacct"
    root = lay_out(
        tmp_path,
        {**V1_DOCKER, f"{group}/cpu.cfs_quota_us": quota, f"{group}/cpu.cfs_period_us": "100000\n"},
    )
    assert cpu_limit(root) == limit
    assert usable_cores(root) == (cores or len(os.sched_getaffinity(0)))


def test_nothing_to_read_is_no_limit(tmp_path: Path) -> None:
    assert cpu_limit(tmp_path) is None
    lay_out(tmp_path, {"proc/self/cgroup": "garbage\n", "proc/self/mountinfo": "- - -\n"})
    assert cpu_limit(tmp_path) is None


V1_CPU = Path("/sys/fs/cgroup/cpu")

PROBE = """
import torch
from fake_openai_server.backends.sentence_transformers import configure_threads
from fake_openai_server.cpus import usable_cores
from fake_openai_server.service.tokenizing import default_workers
configure_threads(None)
print(usable_cores(), torch.get_num_threads(), default_workers("cuda"))
"""


def test_a_real_cpu_limit_cuts_torch_threads_and_tokenizer_processes() -> None:
    """A process in a control group with a quota of one core: one torch thread and no
    tokenizer process (there is no core to spare), whatever the machine has."""
    group = V1_CPU / f"fos-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup v1 cpu group here: {exc}")
    try:
        (group / "cpu.cfs_quota_us").write_text("100000")  # one core per 100 ms period
        probe = subprocess.run(
            [
                "sh",
                "-c",
                f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"',
                sys.executable,
                PROBE,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    finally:
        group.rmdir()
    assert probe.stdout.split() == ["1", "1", "0"]
