"""A busy server does not stop to collect garbage (``memory.settle_after_start``).

With Python's defaults, a server under load spent a quarter of its time in the cyclic
garbage collector: the objects of the requests in flight outlived its frequent passes,
were promoted, and kept triggering full passes over everything the libraries and the app
had built. The CLI's serving path settles the collector once the server is ready; the
collector's own counters (``python_gc_collections_total`` on ``/metrics``) say how often
it ran.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx

from tests.support.live import fake_cli

CLIENTS = 256
REQUESTS = 3000
# Passes over the youngest generation allowed for the whole load (settled: 0-1); with
# Python's defaults the same load made 47, and a full pass.
YOUNG_PASSES = 5


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
