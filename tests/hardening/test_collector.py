"""A busy server does not stop to collect garbage (``memory.settle_after_start``), and a
request makes none that only the collector could free.

With Python's defaults, a server under load spent a quarter of its time in the cyclic
garbage collector: the objects of the requests in flight outlived its frequent passes,
were promoted, and kept triggering full passes over everything the libraries and the app
had built. The CLI's serving path settles the collector once the server is ready; the
collector's own counters (``python_gc_collections_total`` on ``/metrics``) say how often
it ran.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fake_openai_server.api.app import build_app
from fake_openai_server.settings import Settings
from tests.support.fakes import fake_plugin
from tests.support.live import LiveServer, fake_cli, serve_app

CLIENTS = 256
REQUESTS = 3000
# Passes over the youngest generation allowed for the whole load (settled: 0-1); with
# Python's defaults the same load made 47, and a full pass.
YOUNG_PASSES = 5
REQUESTS_WITHOUT_COLLECTOR = 100


def collector_passes(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    found = re.findall(r'^python_gc_collections_total\{generation="(\d)"\} (\S+)$', text, re.M)
    assert len(found) == 3, text
    return {generation: float(count) for generation, count in found}


async def load(base_url: str) -> None:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        todo = iter(range(REQUESTS))

        async def user() -> None:
            for i in todo:
                reply = await client.post("/v1/embeddings", json={"input": f"文{i % 97}"})
                assert reply.status_code == 200, reply.text

        await asyncio.gather(*(user() for _ in range(CLIENTS)))


def test_a_busy_server_does_not_stop_to_collect_garbage(tmp_path: Path) -> None:
    with fake_cli({"service_type": "embeddings", "warmup": False}, {}, tmp_path) as server:
        asyncio.run(load(server.base_url))  # warm: connections, caches, first batches
        before = collector_passes(server.base_url)
        asyncio.run(load(server.base_url))
        after = collector_passes(server.base_url)
    passes = {generation: after[generation] - before[generation] for generation in after}
    assert passes["2"] == 0, passes
    assert passes["0"] <= YOUNG_PASSES, passes


def _post(path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n%s" % (len(data), data)


def _ask(sock: socket.socket, request: bytes) -> None:
    """Send ``request`` and read its whole reply (keep-alive: the connection stays)."""
    sock.sendall(request)
    data = b""
    while True:
        chunk = sock.recv(65536)
        assert chunk, "closed"
        data += chunk
        head, found, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: (\d+)", head)
        if found and length and len(body) >= int(length[1]):
            return


@pytest.fixture(scope="module")
def in_process() -> Iterator[LiveServer]:
    settings = Settings(service_type="all", warmup=False)
    with serve_app(build_app(settings, fake_plugin())) as live:
        yield live


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"input": "東京"}),
        ("/v1/rerank", {"query": "q", "documents": ["a", "b"]}),
        ("/api/embed", {"input": "東京"}),
        ("/embed", {"inputs": "東京"}),
        ("/v1/embeddings", {"input": ""}),  # 400 from the service
        ("/v1/embeddings", {"input": 5}),  # 400 from validation
        ("/nowhere", {}),  # 404
    ],
)
def test_a_request_leaves_no_garbage_for_the_collector(
    in_process: LiveServer, path: str, body: dict[str, Any]
) -> None:
    """Whatever a request leaves is freed as soon as it is done, without the cyclic
    collector: the settled collector runs rarely, and each reference cycle a request
    made would wait for it, holding the request's objects (a uvicorn request cycle held
    in its own scope had left about nine objects per request)."""
    request = _post(path, body)
    with in_process.connect() as sock:
        for _ in range(20):  # warm: caches, first batches
            _ask(sock, request)
        gc.collect()
        gc.disable()
        try:
            for _ in range(REQUESTS_WITHOUT_COLLECTOR):
                _ask(sock, request)
            time.sleep(0.2)  # the server's last task ends after its reply is sent
            garbage = gc.collect()
        finally:
            gc.enable()
    assert garbage < REQUESTS_WITHOUT_COLLECTOR, garbage  # not even one object a request
