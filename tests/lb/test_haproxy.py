"""Replicas behind HAProxy under a steady load: kill one, restart one, add one.

The real `haproxy` binary (the distribution's package) runs deploy/haproxy/haproxy.cfg,
the file compose.multi-gpu.yaml mounts, in front of real server processes (the app over
deterministic fake models whose forward passes take 0.1 s, so that requests are inside a
replica when it is stopped). Eight clients send one-text embedding requests in a loop,
as Dify does, and check every vector they get back.

- SIGKILL: only requests that were inside the killed replica may fail, each with a clear
  error (the LB resends those it can, so usually none fails).
- SIGTERM and start again (a rolling restart of both replicas): no request fails.
- A replica added under load: no request fails, and none reaches it before its /ready
  says 200.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.lb.cluster import (
    GRACE_SECONDS,
    Cluster,
    Load,
    Replica,
    Result,
    haproxy_binary,
    haproxy_version,
)
from tests.lb.cluster import wait_until as until

START_TIMEOUT = 60  # two Python processes importing the app on a loaded 2-core machine


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if haproxy_binary() is None:
        message = "haproxy is not installed (apt-get install haproxy)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


def start(cluster: Cluster) -> tuple[Replica, Replica, Load]:
    """Two ready replicas behind the LB, and the load running through it."""
    a, b = cluster.add_replica(), cluster.add_replica()
    cluster.start_lb()
    cluster.wait_up(a, b, timeout=START_TIMEOUT)
    load = Load(cluster.url)
    load.start()
    until("the load is flowing", lambda: load.completed() >= 20)
    return a, b, load


def keep_loading(load: Load, requests: int) -> None:
    """Let ``requests`` more requests complete (the LB keeps serving)."""
    target = load.completed() + requests
    until(f"{requests} more requests", lambda: load.completed() >= target, timeout=30)


def summary(case: str, results: list[Result], failed: list[Result]) -> str:
    line = f"{case}: {len(results)} requests, {len(failed)} failed"
    print(f"\n{line}")
    return line


def test_sigkill_fails_only_requests_inside_the_killed_replica(cluster: Cluster) -> None:
    a, b, load = start(cluster)
    until("requests inside the replica", lambda: a.in_flight() >= 2)
    slot = cluster.slot_of(a)
    a.signal(signal.SIGKILL)
    killed_at, killed_wall = time.monotonic(), time.time()
    assert a.exit_code(timeout=10) == -signal.SIGKILL
    until("HAProxy marks it down", lambda: cluster.states()[a.address].startswith("DOWN"))
    keep_loading(load, 50)
    results = load.stop()

    failed = [r for r in results if r.error]
    summary("SIGKILL", results, failed)
    log = {line.request_id: line for line in cluster.log_lines()}
    for result in failed:
        # A clear error: the LB's JSON envelope, for a request that was in the killed one.
        assert result.status in (502, 503, 504), result
        assert result.started < killed_at, result
        assert log[result.request_id].server == f"embeddings/{slot}", log[result.request_id]
    assert len(failed) <= 8  # at most what the 8 clients had in flight
    # The requests that were inside it when it died were sent again to the other one.
    resent = [
        line
        for line in log.values()
        if line.retries.lstrip("+") != "0" and line.accepted < killed_wall < line.ended
    ]
    assert resent, "no request in flight at the kill was resent"
    assert all(line.server != f"embeddings/{slot}" and line.status == 200 for line in resent)
    assert [r for r in results if r.started > killed_at + 0.5 and r.error] == []

    # With no replica left, the LB answers at once with its own clear error.
    b.signal(signal.SIGKILL)
    until("HAProxy marks both down", lambda: "UP" not in cluster.states().values())
    reply = httpx.post(f"{cluster.url}/v1/embeddings", json={"input": "x"}, timeout=10)
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "1"
    assert reply.json()["error"]["code"] == "no_replica_ready"


def test_rolling_restart_loses_no_request(cluster: Cluster) -> None:
    a, b, load = start(cluster)
    stops = []  # (slot, when SIGTERM was sent)
    for replica in (a, b):
        until("requests inside the replica", lambda r=replica: r.in_flight() >= 2)
        stops.append((cluster.slot_of(replica), time.time()))
        replica.signal(signal.SIGTERM)
        assert replica.exit_code(timeout=GRACE_SECONDS + 5) == 0  # drained, then exited
        replica.start()  # the same address and port, as a restarted container
        until("it is ready again", replica.ready, timeout=START_TIMEOUT)
        until("HAProxy marks it up", lambda r=replica: cluster.states()[r.address] == "UP")
        until("it serves again", lambda r=replica: r.served() >= 10)
    keep_loading(load, 20)
    results = load.stop()

    failed = [r for r in results if r.error]
    summary("rolling restart (SIGTERM, start again; both replicas)", results, failed)
    assert failed == []
    # Each stopped replica finished, itself, the requests it held at SIGTERM (a drain,
    # not a resend): answered 200 by that replica, accepted before the signal, ended
    # after it, not retried.
    lines = cluster.log_lines()
    for slot, signalled in stops:
        drained = [
            line
            for line in lines
            if line.server == f"embeddings/{slot}"
            and line.status == 200
            and line.retries == "0"
            and line.accepted < signalled < line.ended
        ]
        assert drained, f"{slot}: no request finished on it after SIGTERM"


def test_added_replica_gets_requests_once_ready_and_none_fail(cluster: Cluster) -> None:
    a, b, load = start(cluster)
    rerank = httpx.post(
        f"{cluster.rerank_url}/v1/rerank",
        json={"query": "瑠璃色", "documents": ["瑠璃色は青", "東京"]},
        timeout=30,
    )
    assert rerank.status_code == 200 and len(rerank.json()["results"]) == 2

    c = cluster.add_replica(load_seconds=3)  # in DNS at once; its model takes 3 s to load
    until(
        "HAProxy lists the new replica (down: not ready)",
        lambda: cluster.states().get(c.address, "").startswith("DOWN"),
    )
    assert not c.ready()
    until("the new replica is ready", c.ready, timeout=START_TIMEOUT)
    until("HAProxy marks it up", lambda: cluster.states()[c.address] == "UP")
    until("it takes its share", lambda: c.served() >= 20)
    results = load.stop()

    failed = [r for r in results if r.error]
    early = c.served("503")  # requests it got while its model was loading
    summary(
        f"replica added under load ({early:.0f} sent to it before ready, resent)", results, failed
    )
    assert failed == []
    assert a.served() > 0 and b.served() > 0
    if haproxy_version() >= (3, 1):
        assert early == 0  # init-state down: nothing before its first check passes
    else:
        # Older HAProxy counts a replica up from its listing by DNS to its first check,
        # at most one check interval (1 s): what it got meanwhile it answered 503 and
        # the LB resent (no client saw it). At most that second's worth of requests.
        per_second = len(results) / (results[-1].ended - results[0].started)
        assert early <= per_second * 1.0 + load.clients
