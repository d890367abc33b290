"""HAProxy (the distribution's binary, the config compose ships) in front of real server
processes on loopback, found through DNS the way Docker's DNS lists containers.

Every replica listens on the same port on its own loopback address (127.0.0.2,
127.0.0.3, ...), as every container listens on 8081 at its own address; the DNS server
answers the replicas' alias with those addresses. Only the FOS_LB_* environment
variables of deploy/haproxy/haproxy.cfg differ from compose: they point HAProxy at
this DNS server and at free ports.
"""

from __future__ import annotations

import csv
import datetime
import io
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path

import httpx

from tests.lb import replica as replica_process
from tests.lb.dns import DnsServer
from tests.support.fakes import fake_text_vector
from tests.support.live import free_port, metric, stop_process

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
ALIAS = "embeddings-replica"  # compose.multi-gpu.yaml's network alias
RERANK_ALIAS = "reranker-replica"
BATCH_SECONDS = 0.1  # each fake forward pass: requests spend a while inside a replica
GRACE_SECONDS = 10
# Replicas are forked by a server process that has already imported the app.
_PROCESSES = multiprocessing.get_context("forkserver")
_PROCESSES.set_forkserver_preload([replica_process.__name__])


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None
    )


def haproxy_version() -> tuple[int, int]:
    binary = haproxy_binary()
    assert binary is not None
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"version (\d+)\.(\d+)", out)
    assert match, out
    return int(match[1]), int(match[2])


def _port_free_on(addresses: list[str]) -> int:
    """A port that is free on every one of ``addresses``."""
    for _ in range(50):
        port = free_port()
        try:
            for address in addresses:
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on all loopback addresses")


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 20) -> float:
    """Poll ``predicate`` until true; return the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not after {timeout}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


@dataclass
class Replica:
    """One server process (the real app over deterministic fake models)."""

    address: str
    port: int
    log_path: Path
    load_seconds: float = 0.0
    process: BaseProcess | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def start(self) -> None:
        settings = {
            "service_type": "all",
            "host": self.address,
            "port": self.port,
            "shutdown_grace_seconds": GRACE_SECONDS,
        }
        self.process = _PROCESSES.Process(
            target=replica_process.run,
            args=(settings, BATCH_SECONDS, self.load_seconds, str(self.log_path)),
            daemon=True,
        )
        self.process.start()

    def exit_code(self, timeout: float) -> int | None:
        """Wait for the process to end; its exit code (-9: SIGKILL)."""
        assert self.process is not None
        self.process.join(timeout)
        return self.process.exitcode

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def in_flight(self) -> float:
        return metric(self.base_url, "fos_requests_in_progress", route="/v1/embeddings")

    def served(self, status: str = "200") -> float:
        return metric(self.base_url, "fos_requests_total", route="/v1/embeddings", status=status)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None and self.process.pid is not None
        os.kill(self.process.pid, sig)

    def stop(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(GRACE_SECONDS + 5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()


@dataclass
class Result:
    request_id: str
    started: float
    ended: float
    status: int | None  # None: no HTTP reply at all
    error: str | None = None  # the error message the client got, for failures


@dataclass
class Load:
    """Concurrent clients, each sending one-text embedding requests (Dify's shape) in a
    loop over its own keep-alive connection, checking every vector it gets back."""

    url: str
    clients: int = 8
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> list[Result]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self.results

    def completed(self) -> int:
        return len(self.results)

    def _client(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                request_id = f"load-{n}-{i}-{uuid.uuid4().hex[:8]}"
                text = f"負荷試験 {n} の {i} 番目"
                started = time.monotonic()
                status: int | None = None
                error: str | None = None
                try:
                    reply = client.post(
                        "/v1/embeddings",
                        json={"input": [text]},
                        headers={"X-Request-Id": request_id},
                    )
                    status = reply.status_code
                    if status == 200:
                        got = reply.json()["data"][0]["embedding"]
                        want = fake_text_vector(text).tolist()
                        if max(abs(a - b) for a, b in zip(got, want, strict=True)) > 1e-5:
                            error = "wrong vector"
                    else:
                        error = reply.json()["error"]["message"]
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.results.append(
                        Result(request_id, started, time.monotonic(), status, error)
                    )


@dataclass
class LogLine:
    """One line of HAProxy's `option httplog`."""

    accepted: float  # when HAProxy accepted the request (epoch seconds)
    total: float  # seconds from then to the end of the reply (%Ta)
    server: str  # e.g. embeddings/embeddings-2: the last one tried
    status: int
    termination: str  # e.g. ----, SH--, sC--
    retries: str  # %rc: "0", "1", "+1" (redispatched)
    request_id: str

    @property
    def ended(self) -> float:
        return self.accepted + self.total


_HTTPLOG = re.compile(
    r"\[(?P<accepted>[^\]]+)\] \S+ (?P<backend>\S+)/(?P<server>\S+) "
    r"\S+/\S+/\S+/\S+/(?P<total>-?\d+) (?P<status>-?\d+) \S+ \S+ \S+ (?P<term>\S{4}) "
    r"\S+/\S+/\S+/\S+/(?P<retries>\+?\d+) \S+ \{(?P<request_id>[^}]*)\}"
)


def _log_time(text: str) -> float:
    """HAProxy's local time, e.g. 26/Nov/2026:00:48:11.833, as epoch seconds."""
    moment = datetime.datetime.strptime(text, "%d/%b/%Y:%H:%M:%S.%f")
    return time.mktime(moment.timetuple()) + moment.microsecond / 1e6


class Cluster:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.addresses = [f"127.0.0.{n}" for n in range(2, 8)]
        self.port = _port_free_on(self.addresses)
        self.dns = DnsServer()
        self.lb_port = free_port()
        self.rerank_port = free_port()
        self.stats_port = free_port()
        self.replicas: list[Replica] = []
        self.lb: subprocess.Popen[bytes] | None = None
        self.lb_log = tmp_path / "haproxy.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def rerank_url(self) -> str:
        return f"http://127.0.0.1:{self.rerank_port}"

    # --- replicas ------------------------------------------------------------------
    def add_replica(self, load_seconds: float = 0.0) -> Replica:
        """Start a replica; like a container, it is in DNS from the start (not ready yet)."""
        address = self.addresses[len(self.replicas)]
        replica = Replica(
            address, self.port, self.tmp_path / f"replica-{address}.log", load_seconds
        )
        replica.start()
        self.replicas.append(replica)
        self.dns.add(ALIAS, address)
        self.dns.add(RERANK_ALIAS, address)
        return replica

    # --- the load balancer -----------------------------------------------------------
    def start_lb(self) -> None:
        binary = haproxy_binary()
        assert binary is not None
        env = {
            **os.environ,
            "FOS_LB_DNS": self.dns.address,
            "FOS_LB_EMBEDDINGS_BIND": f"127.0.0.1:{self.lb_port}",
            "FOS_LB_RERANKER_BIND": f"127.0.0.1:{self.rerank_port}",
            "FOS_LB_STATS_BIND": f"127.0.0.1:{self.stats_port}",
            "FOS_LB_EMBEDDINGS_REPLICAS": f"{ALIAS}:{self.port}",
            "FOS_LB_RERANKER_REPLICAS": f"{RERANK_ALIAS}:{self.port}",
        }
        with self.lb_log.open("wb") as log:
            self.lb = subprocess.Popen(
                [binary, "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=log, stderr=log
            )

        def listening() -> bool:
            assert self.lb is not None and self.lb.poll() is None, self.lb_log.read_text()
            try:
                self._stats("embeddings")
            except httpx.HTTPError:
                return False
            return True

        wait_until("HAProxy listens", listening, timeout=10)

    def states(self, backend: str = "embeddings") -> dict[str, str]:
        """Replica address -> HAProxy's status of its slot (UP, DOWN, MAINT, ...)."""
        return {row["addr"].rsplit(":", 1)[0]: row["status"] for row in self._stats(backend)}

    def slot_of(self, replica: Replica) -> str:
        """The server-template slot (e.g. embeddings-2) that holds ``replica``."""
        for row in self._stats("embeddings"):
            if row["addr"].rsplit(":", 1)[0] == replica.address:
                return row["svname"]
        raise KeyError(replica.address)

    def _stats(self, backend: str) -> list[dict[str, str]]:
        reply = httpx.get(f"http://127.0.0.1:{self.stats_port}/;csv", timeout=5)
        rows = csv.DictReader(io.StringIO(reply.text.lstrip("# ")))
        return [
            row
            for row in rows
            if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
        ]

    def wait_up(self, *replicas: Replica, timeout: float = 20) -> float:
        return wait_until(
            f"HAProxy sees {[r.address for r in replicas]} UP",
            lambda: all(self.states().get(r.address) == "UP" for r in replicas),
            timeout,
        )

    def log_lines(self) -> list[LogLine]:
        lines = []
        for line in self.lb_log.read_text(errors="replace").splitlines():
            if match := _HTTPLOG.search(line):
                lines.append(
                    LogLine(
                        _log_time(match["accepted"]),
                        int(match["total"]) / 1000,
                        f"{match['backend']}/{match['server']}",
                        int(match["status"]),
                        match["term"],
                        match["retries"],
                        match["request_id"],
                    )
                )
        return lines

    def close(self) -> None:
        for replica in self.replicas:
            replica.stop()
        if self.lb is not None:
            stop_process(self.lb, timeout=10)
        self.dns.close()
