"""How many cores this process may use: the CPUs it may run on, or fewer where a CPU limit
says so (``docker run --cpus``, compose's ``cpus``, a Kubernetes ``limits.cpu``).

A container's CPU limit is a quota of CPU time per period in its control group, which
neither ``os.sched_getaffinity`` nor torch sees: on a 64-core node, a pod limited to 4
cores would run torch with a thread for each of the node's cores (each a share of 4 cores,
throttled in turn) and, on a GPU, 8 tokenizer processes. The limit is read as the kernel
publishes it, in cgroup v2's ``cpu.max`` or cgroup v1's ``cpu.cfs_quota_us`` and
``cpu.cfs_period_us``, for the process's own group and every group above it that its
mount shows (Kubernetes sets one for the pod and one for the container).
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cores(root: Path = Path("/")) -> int:
    """The cores this process may use (at least 1); ``root``: where /proc and /sys are."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    limit = cpu_limit(root)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


def cpu_limit(root: Path = Path("/")) -> float | None:
    """The CPU limit of this process's control groups, in cores (1.5: a quota of 150 ms
    each 100 ms); None where there is none, or nothing says."""
    try:
        groups = (root / "proc/self/cgroup").read_text().splitlines()
        mounts = (root / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    limits = [
        limit
        for folder, top, version in _cpu_groups(root, groups, mounts)
        for group in _upwards(folder, top)
        if (limit := _quota(group, version)) is not None
    ]
    return min(limits, default=None)


def _cpu_groups(root: Path, groups: list[str], mounts: list[str]) -> list[tuple[Path, Path, int]]:
    """For each mounted hierarchy that holds the cpu controller: the process's group
    folder, the mount point (the highest folder it shows) and the cgroup version."""
    paths: dict[int, str] = {}  # cgroup version: the process's group in that hierarchy
    for line in groups:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and not controllers:
            paths[2] = path
        elif "cpu" in controllers.split(","):
            paths[1] = path
    found = []
    for line in mounts:
        fields = line.split()
        dash = fields.index("-") if "-" in fields else -1
        if dash < 5 or len(fields) < dash + 4:  # not a line as the kernel writes them
            continue
        mount_root, mount_point = fields[3], fields[4]
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        if fstype == "cgroup2":
            version = 2
        elif fstype == "cgroup" and "cpu" in options:
            version = 1
        else:
            continue
        group = paths.get(version)
        if group is None:
            continue
        inside = os.path.relpath(group, mount_root)
        if inside.startswith(".."):  # the group is not under what this mount shows
            inside = "."
        top = root / mount_point.lstrip("/")
        found.append((top / inside, top, version))
    return found


def _upwards(folder: Path, top: Path) -> list[Path]:
    """``folder`` and each folder above it, up to and with ``top``."""
    chain = [folder]
    while folder != top and folder.parent != folder:
        folder = folder.parent
        chain.append(folder)
    return chain


def _quota(folder: Path, version: int) -> float | None:
    """The CPU limit set in ``folder``, in cores; None where none is."""
    try:
        if version == 2:
            quota, _, period = (folder / "cpu.max").read_text().partition(" ")
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text()
            period = (folder / "cpu.cfs_period_us").read_text()
        quota_us, period_us = int(quota), int(period)
    except (OSError, ValueError):  # absent, or "max": no limit
        return None
    if quota_us <= 0 or period_us <= 0:  # v1's -1: no limit
        return None
    return quota_us / period_us
