"""The batching engine: requests share batches, each gets exactly its own rows, in order."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from fake_openai_server.api.app import build_app
from fake_openai_server.backends.base import FloatArray, TokenIds
from fake_openai_server.engine.batcher import Batcher, BatchReport
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.settings import Settings
from tests.support.fakes import fake_loader, fake_text_vector
from tests.support.live import serve_app

pytestmark = pytest.mark.anyio


class Recorder:
    """A model that returns each item's first token id and records its batches."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.batches: list[list[list[int]]] = []
        self.threads: set[str] = set()

    def __call__(self, batch: Sequence[TokenIds]) -> FloatArray:
        self.threads.add(threading.current_thread().name)
        self.batches.append([list(ids) for ids in batch])
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and any(ids[0] == self.fail_on for ids in batch):
            raise RuntimeError("CUDA out of memory (simulated)")
        return np.array([[ids[0], len(ids)] for ids in batch], dtype=np.float32)


def make(run: Recorder, **limits: int) -> Batcher:
    options = {"max_batch_size": 64, "max_batch_tokens": 4096, "max_queue_tokens": 100_000}
    options.update(limits)
    return Batcher(run, **options)


async def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    run = Recorder(delay=0.05)
    batcher = make(run)
    batcher.start()
    requests = [[[1000 * r + i] * (1 + (r + i) % 7) for i in range(1 + r % 3)] for r in range(40)]
    results = await asyncio.gather(*(batcher.submit(items) for items in requests))
    await batcher.stop()
    for items, out in zip(requests, results, strict=True):
        assert out[:, 0].tolist() == [ids[0] for ids in items]  # own rows, own order
        assert out[:, 1].tolist() == [len(ids) for ids in items]
    assert max(len(b) for b in run.batches) > 10  # items from many requests in one pass
    assert batcher.stats.items == sum(len(items) for items in requests)
    assert run.threads and all(name.startswith("infer") for name in run.threads)


async def test_lone_request_runs_at_once() -> None:
    run = Recorder()
    batcher = make(run)
    batcher.start()
    started = time.perf_counter()
    await batcher.submit([[1, 2, 3]])
    assert time.perf_counter() - started < 0.05
    await batcher.stop()


async def test_batches_respect_size_and_token_budget() -> None:
    run = Recorder(delay=0.01)
    batcher = make(run, max_batch_size=8, max_batch_tokens=200)
    batcher.start()
    lengths = [5, 90, 7, 50, 100, 3, 60, 8, 40, 99] * 6
    await asyncio.gather(*(batcher.submit([[i] * n]) for i, n in enumerate(lengths)))
    await batcher.stop()
    for batch in run.batches:
        assert len(batch) <= 8
        assert len(batch) * max(len(ids) for ids in batch) <= 200


async def test_similar_lengths_are_grouped() -> None:
    """Short items wait together instead of being padded to the long ones."""
    run = Recorder(delay=0.02)
    batcher = make(run, max_batch_tokens=10_000)
    batcher.start()
    blocker = asyncio.ensure_future(batcher.submit([[0] * 4]))  # occupies the model
    await asyncio.sleep(0.005)
    items = [[[i] * (4 if i % 2 else 400)] for i in range(1, 33)]
    await asyncio.gather(*(batcher.submit(x) for x in items))
    await blocker
    await batcher.stop()
    padded = sum(len(b) * max(len(ids) for ids in b) for b in run.batches[1:])
    real = sum(len(ids) for b in run.batches[1:] for ids in b)
    assert padded / real < 1.2


async def test_cancelled_request_is_not_computed() -> None:
    run = Recorder(delay=0.1)
    batcher = make(run)
    batcher.start()
    busy = asyncio.ensure_future(batcher.submit([[1]]))
    await asyncio.sleep(0.02)
    doomed = asyncio.ensure_future(batcher.submit([[666]] * 5))
    await asyncio.sleep(0.01)
    doomed.cancel()
    await busy
    await batcher.submit([[2]])
    await batcher.stop()
    assert all(ids[0] != 666 for batch in run.batches for ids in batch)
    assert batcher.queued_tokens == 0


async def test_full_queue_refuses_at_once() -> None:
    run = Recorder(delay=0.1)
    batcher = make(run, max_queue_tokens=50)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit([[1] * 10]))  # taken by the worker
    await asyncio.sleep(0.02)
    second = asyncio.ensure_future(batcher.submit([[2] * 40]))  # waits in the queue
    await asyncio.sleep(0.01)
    with pytest.raises(ServiceError) as refused:
        await batcher.submit([[3] * 20])
    assert refused.value.kind is ErrorKind.OVERLOADED
    await asyncio.gather(first, second)
    await batcher.stop()


async def test_failed_batch_fails_only_its_requests() -> None:
    run = Recorder(delay=0.02, fail_on=13)
    batcher = make(run, max_batch_size=1)
    batcher.start()
    results = await asyncio.gather(
        batcher.submit([[12]]),
        batcher.submit([[13]]),
        batcher.submit([[14]]),
        return_exceptions=True,
    )
    assert isinstance(results[1], ServiceError)
    assert results[1].kind is ErrorKind.MODEL_FAILURE
    assert "out of memory" not in results[1].message  # no internals in the reply
    assert results[0][0, 0] == 12 and results[2][0, 0] == 14  # type: ignore[index]
    assert (await batcher.submit([[15]]))[0, 0] == 15  # still serving
    await batcher.stop()


async def test_reports_how_long_each_item_waited_for_the_model() -> None:
    """The queue wait an autoscaler reads: ~0 for a lone request, a whole forward pass
    for a request that arrived while the model was busy."""
    run = Recorder(delay=0.2)
    reports: list[BatchReport] = []
    batcher = Batcher(
        run, max_batch_size=1, max_batch_tokens=4096, max_queue_tokens=100, observer=reports.append
    )
    batcher.start()
    first = asyncio.ensure_future(batcher.submit([[1]]))
    await asyncio.sleep(0.05)  # the first pass is running
    await asyncio.gather(first, batcher.submit([[2], [3]]))
    await batcher.stop()
    waits = [report.queue_seconds for report in reports]
    assert [len(w) for w in waits] == [1, 1, 1]  # one per item, batches of one
    assert waits[0][0] < 0.05
    assert 0.1 < waits[1][0] < 0.2 + 0.2  # waited for the rest of the first pass
    assert 0.3 < waits[2][0] < 0.4 + 0.2  # and for item 2's pass as well


async def test_shared_inference_thread() -> None:
    """Several models (SERVICE_TYPE=all) take turns on one inference thread."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
    a, b = Recorder(), Recorder()
    opts = {"max_batch_size": 8, "max_batch_tokens": 100, "max_queue_tokens": 1000}
    ba, bb = Batcher(a, executor=executor, **opts), Batcher(b, executor=executor, **opts)
    ba.start()
    bb.start()
    await asyncio.gather(ba.submit([[1]]), bb.submit([[2]]))
    await ba.stop()
    await bb.stop()
    executor.shutdown()
    assert len(a.threads | b.threads) == 1


def test_many_dify_users_share_batches_over_http() -> None:
    """32 concurrent one-text requests (Dify's shape): shared batches, own vectors."""
    settings = Settings(warmup=False)
    app = build_app(settings, fake_loader(delay=0.05))
    texts = [f"ユーザー{i}の文書です" for i in range(32)]

    async def scenario(base_url: str) -> list[list[float]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            replies = await asyncio.gather(
                *(client.post("/v1/embeddings", json={"input": [t]}) for t in texts)
            )
            assert all(r.status_code == 200 for r in replies)
            info = (await client.get("/info")).json()
        assert info["engine"]["cl-nagoya/ruri-large"]["mean_batch_size"] >= 4
        return [r.json()["data"][0]["embedding"] for r in replies]

    with serve_app(app) as server:
        vectors = asyncio.run(scenario(server.base_url))
    for text, vector in zip(texts, vectors, strict=True):
        np.testing.assert_allclose(vector, fake_text_vector(text), rtol=1e-6)
