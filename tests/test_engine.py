"""The batching engine: requests share batches, each gets exactly its own rows, in order.

The queue's batch formation is tested on its own; the engine runs the fake models in
a real engine process (``tests/support/fakes.py``), as the server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fake_openai_server.api.app import build_app
from fake_openai_server.backends.base import Encoded, FloatArray, IdArray, ModelInfo, Padding
from fake_openai_server.engine.core import BatchReport, Engine
from fake_openai_server.engine.queue import BatchLimits, BucketQueue, Flow, Item
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.service.common import (
    FIRST_CHUNK,
    TOKENIZE_CHUNK,
    chunk_sizes,
    pipeline,
)
from fake_openai_server.settings import Settings
from tests.support.fakes import char_ids, fake_plugin, fake_text_vector
from tests.support.live import serve_app

MODEL = "cl-nagoya/ruri-large"


# --- the queue ------------------------------------------------------------------------------
class Job:
    gone = False


def items(*lengths: int, job: Any = None) -> list[Item]:
    owner = job or Job()
    return [Item(owner, i, np.full(n, i, dtype=np.int32)) for i, n in enumerate(lengths)]


LIMITS = BatchLimits(max_items=64, max_tokens=4096, max_padding=1.1, free_waste=0)


def test_a_batch_starts_from_the_oldest_item_and_takes_the_closest_lengths() -> None:
    queue = BucketQueue()
    queue.push(items(300, 20, 310, 21, 290, 22, 500, 26))
    first = queue.take(LIMITS)
    assert sorted(item.cost for item in first) == [290, 300, 310]
    second = queue.take(LIMITS)
    assert sorted(item.cost for item in second) == [20, 21, 22]  # 26 would pad over 10%
    assert [item.cost for item in queue.take(LIMITS)] == [500]
    assert [item.cost for item in queue.take(LIMITS)] == [26]
    assert queue.take(LIMITS) == [] and queue.tokens == 0 and len(queue) == 0


def test_batches_respect_size_and_token_budget() -> None:
    queue = BucketQueue()
    lengths = [5, 90, 7, 50, 100, 3, 60, 8, 40, 99] * 6
    queue.push(items(*lengths))
    limits = BatchLimits(max_items=8, max_tokens=200, max_padding=1.1, free_waste=0)
    taken = 0
    while batch := queue.take(limits):
        assert len(batch) <= 8
        assert len(batch) * max(item.cost for item in batch) <= 200
        taken += len(batch)
    assert taken == len(lengths)


def test_free_waste_lets_a_batch_mix_lengths() -> None:
    """Where a pass costs more than padding (a GPU), one pass takes them all."""
    queue = BucketQueue()
    queue.push(items(100, 300, 500, 120, 480))
    limits = BatchLimits(max_items=64, max_tokens=4096, max_padding=1.1, free_waste=2000)
    assert len(queue.take(limits)) == 5


def test_items_of_a_gone_request_are_skipped_and_counted_out() -> None:
    queue = BucketQueue()
    gone = Job()
    queue.push(items(10, 10, 10, job=gone))
    queue.push(items(11, 12))
    gone.gone = True
    queue.forget(3, 30)
    assert queue.tokens == 23 and len(queue) == 2
    batch = queue.take(LIMITS)
    assert sorted(item.cost for item in batch) == [11, 12]
    assert queue.take(LIMITS) == [] and queue.tokens == 0


def test_items_of_gone_requests_never_pile_up_where_no_batch_looks() -> None:
    """Requests of long texts whose clients leave, while short texts keep every batch
    full: no batch visits the long texts' buckets again, and their entries are dropped
    all the same once they outnumber the live ones (they had piled up for good: 10,000
    after 200 such requests, seen failing; from a disconnects audit)."""
    queue = BucketQueue()
    limits = BatchLimits(max_items=8, max_tokens=10**6, max_padding=1.1, free_waste=0)
    for _ in range(200):
        gone, live = Job(), Job()
        long_items = items(*range(400, 450), job=gone)
        queue.push(long_items)
        queue.push(items(*[5] * 8, job=live))
        gone.gone = True
        queue.forget(len(long_items), sum(item.cost for item in long_items))
        batch = queue.take(limits)
        assert [item.job for item in batch] == [live] * 8
        assert queue.items == 0
        assert queue.held <= 2 * (1024 + 58)


def _random_traffic(seed: int, seconds_per_token: float) -> None:
    """400 random steps on one queue: requests arrive (in 1-3 chunks of one flow), leave,
    or a batch is taken; after every step the queue agrees with a plain list of the live
    items, and at the end every item of a request that stayed was taken, once."""
    rng = random.Random(seed)
    gpu = Padding((1, 2, 4, 8, 16, 32, 64), 32, 64, 256, max_length=512)
    padding = gpu if seed % 2 else Padding()
    queue = BucketQueue(quantum=(0, 100, 4096)[seed % 3], seconds_per_token=seconds_per_token)
    limits = BatchLimits(
        max_items=rng.choice([1, 3, 8, 64]),
        max_tokens=rng.choice([600, 2048, 4096]),
        max_padding=1.1,
        free_waste=rng.choice([0, 50, 4096]),
        padding=padding,
    )
    requests: list[tuple[Job, list[Item]]] = []
    taken: set[int] = set()

    def take() -> list[Item]:
        batch = queue.take(limits)
        for item in batch:
            assert id(item) not in taken and not item.job.gone
            taken.add(id(item))
        return batch

    now = 0.0
    for _ in range(400):
        now += rng.random() * 0.01
        live = [item for _, its in requests for item in its if item.live]
        roll = rng.random()
        if roll < 0.35:
            job, flow = Job(), Flow()
            lengths = [rng.choice([1, 5, 31, 100, 300, 512]) for _ in range(rng.randint(1, 20))]
            its = [Item(job, i, np.zeros(n, np.int32), enqueued=now) for i, n in enumerate(lengths)]
            cuts = sorted(rng.sample(range(1, len(its)), min(rng.randint(0, 2), len(its) - 1)))
            for start, stop in zip([0, *cuts], [*cuts, len(its)], strict=True):
                queue.push(its[start:stop], flow, now)
            requests.append((job, its))
        elif roll < 0.45 and requests:
            job, its = rng.choice(requests)
            if not job.gone:
                job.gone = True
                left = [item for item in its if not item.taken]
                queue.forget(len(left), sum(item.cost for item in left))
        else:
            batch = take()
            assert bool(batch) == bool(live)
            if batch:
                assert min(item.due for item in live) in {item.due for item in batch}
                assert len(batch) <= limits.max_items
                rows, length = padding.shape(len(batch), max(item.cost for item in batch))
                assert len(batch) == 1 or rows * length <= limits.max_tokens
        live = [item for _, its in requests for item in its if item.live]
        assert (queue.items, queue.tokens) == (len(live), sum(item.cost for item in live))
        assert queue.held <= 2 * len(live) + 2 * max(1024, len(live)) + 2
    while take():
        pass
    assert queue.items == queue.tokens == 0
    for job, its in requests:
        assert job.gone or all(id(item) in taken for item in its)


@pytest.mark.parametrize("seconds_per_token", [0.0, 1e-4], ids=["first-come", "paced"])
def test_the_queue_keeps_its_books_under_random_traffic(seconds_per_token: float) -> None:
    """No item is taken twice or lost, the item due first is always in the next batch,
    batches keep their limits, and the counters stay exact (first come, and paced)."""
    for seed in range(60):
        _random_traffic(seed, seconds_per_token)


def test_taking_a_batch_costs_the_same_at_any_queue_length() -> None:
    """100,000 items waiting: a batch is formed in about the time it takes with 1,000."""

    def per_batch(n: int) -> float:
        queue = BucketQueue()
        rng = np.random.default_rng(0)
        queue.push(items(*rng.integers(4, 500, n).tolist()))
        started = time.perf_counter()
        for _ in range(50):
            queue.take(LIMITS)
        return (time.perf_counter() - started) / 50

    small, large = per_batch(1_000), per_batch(100_000)
    assert large < 0.005, large  # well under a millisecond here; loose for a busy machine
    assert large < 10 * small + 0.001, (small, large)


def batch_of(queue: BucketQueue, limits: BatchLimits, item: Item) -> int:
    """Which batch (0, 1, ...) the queue gives ``item`` in."""
    for number in range(10_000):
        if item in queue.take(limits):
            return number
    raise AssertionError("never taken")


FIVE = BatchLimits(max_items=5, max_tokens=4096, max_padding=1.1, free_waste=0)


@pytest.mark.parametrize("paced", [True, False], ids=["paced", "first-come"])
def test_a_short_request_waits_for_one_batch_of_a_bulk_request_not_all_of_it(
    paced: bool,
) -> None:
    """A bulk request's first ``quantum`` tokens are due on arrival, the rest at the
    pace (seconds per token) the queue is given: a one-text request that arrives after
    it goes ahead of its items due later. Without a pace (0), first come first served:
    the one text waits behind all of the bulk request's 100 items."""
    queue = BucketQueue(quantum=1000, seconds_per_token=0.001 if paced else 0.0)
    queue.push(items(*[100] * 100), Flow(), now=0.0)  # items 0-10 due at 0, 11 at 0.1, ...
    single = items(100)
    queue.push(single, Flow(), now=0.05)
    # Paced: after items 0-10 (two batches of five, then 10 with it), before item 11.
    assert batch_of(queue, FIVE, single[0]) == (2 if paced else 20)


@pytest.mark.parametrize("least_cost", [200, 0], ids=["share-of-a-batch", "tokens-only"])
def test_a_bulk_request_of_short_texts_is_paced_by_batches_too(least_cost: int) -> None:
    """Short texts fill a batch on items (five here) long before its tokens: each counts
    at least its share of a batch (1000 tokens / 5 items), so a one-text request waits
    for about one batch of them. Counted by tokens alone (10 each), the bulk request's
    first 100 items were all due on arrival, 20 batches ahead of it."""
    queue = BucketQueue(quantum=1000, seconds_per_token=0.001, least_cost=least_cost)
    queue.push(items(*[10] * 100), Flow(), now=0.0)  # shared: items 0-5 due at 0, 6 at 0.2
    single = items(10)
    queue.push(single, Flow(), now=0.05)
    assert batch_of(queue, FIVE, single[0]) == (1 if least_cost else 20)


def test_a_bulk_request_is_never_starved_by_short_ones_arriving_after_it() -> None:
    """Its items are due at fixed times, so each goes before every short request that
    arrives after it is due, however many keep arriving and keep the model busy."""
    queue = BucketQueue(quantum=0, seconds_per_token=0.001)
    bulk = items(*[100] * 20)
    queue.push(bulk, Flow(), now=0.0)  # due at 0, 0.1, ..., 1.9
    shorts: list[Item] = []
    taken: list[Item] = []
    for step in range(60):  # a short request every 0.05 s, one item taken for each
        shorts += items(100)
        queue.push(shorts[-1:], Flow(), now=0.05 * step)
        taken += queue.take(BatchLimits(1, 4096, 1.1, 0))
    assert all(item in taken for item in bulk)
    for item in bulk:
        after = [short for short in shorts if short.due > item.due]
        assert all(taken.index(item) < taken.index(s) for s in after if s in taken)
    assert taken.index(bulk[-1]) < taken.index(shorts[39])  # due 1.9, before 1.95's


def test_a_request_queued_in_chunks_is_paced_as_one() -> None:
    """Its ``Flow`` carries the tokens queued so far from chunk to chunk."""
    queue = BucketQueue(quantum=200, seconds_per_token=0.001)
    flow = Flow()
    first, second = items(100, 100, 100), items(100, 100)
    queue.push(first, flow, now=1.0)
    queue.push(second, flow, now=1.01)
    # 200 tokens due on arrival, then 0.1 s a hundred tokens: 1.1, 1.2; the first
    # chunk's due at 1.0, the second's arrival at 1.01 does not reset the pace.
    assert [item.due for item in first + second] == pytest.approx([1.0, 1.0, 1.0, 1.1, 1.2])
    assert flow.tokens == 500


def gpu_padding(max_length: int = 512) -> Padding:
    """The real backend's padding on CUDA (tests/test_cuda_graphs.py runs it there)."""
    from fake_openai_server.backends import sentence_transformers as st

    steps = (st.LENGTH_STEP, st.LONG_STEP, st.WARM_LENGTH)
    return Padding(st.BATCH_SIZES, *steps, max_length=max_length)


@pytest.mark.parametrize("max_items", [64, 50])
def test_on_a_gpu_every_batch_takes_a_shape_warmed_at_start_up(max_items: int) -> None:
    """A deep queue of mixed lengths (256 clients, a bulk request): each batch's padded
    shape is one the model warmed and captured, within MAX_BATCH_TOKENS. (While the
    queue counted only items x longest, 61% of the batches of 256 clients over the
    benchmark's texts rounded up to shapes never warmed, and ran without a graph.)"""
    padding = gpu_padding()
    warmed = set(padding.shapes(max_items, 16384))
    limits = BatchLimits(max_items, 16384, max_padding=1.1, free_waste=16384, padding=padding)
    rng = np.random.default_rng(1)
    queue = BucketQueue()
    queue.push(items(*rng.integers(20, 512, 256).tolist()))
    sizes = []
    for _ in range(500):
        batch = queue.take(limits)
        rows, length = padding.shape(len(batch), max(item.cost for item in batch))
        assert (rows, length) in warmed and rows * length <= 16384, (len(batch), rows, length)
        sizes.append(len(batch))
        queue.push(items(*rng.integers(20, 512, len(batch)).tolist()))
    assert np.mean(sizes) > 25  # still full batches: 16384 tokens hold ~32 of 500


def test_padding_on_a_cpu_and_on_a_gpu() -> None:
    assert Padding().shape(7, 333) == (7, 333)  # a CPU: nothing beyond the longest
    assert Padding().shapes(64, 16384) == []  # every batch is a shape of its own
    assert gpu_padding().shape(7, 333) == (8, 352)
    assert gpu_padding(8192).shape(1, 5000) == (1, 5120)  # coarser past 1,024 tokens
    assert len(gpu_padding().shapes(64, 16384)) == 231  # ruri-large's, warmed at start-up
    # A maximum length that is no multiple of the step is itself a warmed length.
    odd = gpu_padding(514)
    assert odd.shape(5, 514) == (6, 514) and (6, 514) in odd.shapes(64, 16384)


def test_model_info_crosses_processes_with_its_padding() -> None:
    info = ModelInfo("m", "embeddings", 512, dimension=8, padding=gpu_padding())
    assert ModelInfo.from_dict(json.loads(json.dumps(info.as_dict()))) == info
    plain = ModelInfo("m", "rerank", 512)
    assert ModelInfo.from_dict(json.loads(json.dumps(plain.as_dict()))) == plain


# --- the engine, with its process -------------------------------------------------------------
@pytest.fixture
async def engine_factory(tmp_path: Path) -> AsyncIterator[Any]:
    engines: list[Engine] = []

    async def make(**options: Any) -> tuple[Engine, Path]:
        record = tmp_path / f"batches-{len(engines)}.jsonl"
        limits = {
            name: options.pop(name)
            for name in ("max_batch_size", "max_batch_tokens", "max_queue_tokens", "stall_timeout")
            if name in options
        }
        limits.setdefault("max_queue_tokens", 100_000)
        limits.setdefault("max_batch_tokens", min(4096, limits["max_queue_tokens"]))
        settings = Settings(warmup=False, max_request_tokens=limits["max_queue_tokens"], **limits)
        plugin = fake_plugin(echo=True, record=str(record), **options)
        engine = Engine(settings, plugin, str(tmp_path))
        await engine.start()
        engines.append(engine)
        return engine, record

    yield make
    for engine in engines:
        await engine.stop()


def ids(*values: int) -> IdArray:
    return np.asarray(values, dtype=np.int32)


def recorded(path: Path) -> list[list[list[int]]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.anyio
async def test_concurrent_requests_share_batches_and_get_their_own_rows(
    engine_factory: Any,
) -> None:
    engine, record = await engine_factory(delay=0.05)
    requests = [
        [ids(*[1000 * r + i] * (1 + (r + i) % 7)) for i in range(1 + r % 3)] for r in range(40)
    ]
    results = await asyncio.gather(*(engine.submit(MODEL, rows) for rows in requests))
    for rows, out in zip(requests, results, strict=True):
        assert out[:, 0].tolist() == [row[0] for row in rows]  # own rows, own order
        assert out[:, 1].tolist() == [len(row) for row in rows]
    assert max(len(batch) for batch in recorded(record)) > 10  # many requests in one pass
    assert engine.stats()[MODEL]["items"] == sum(len(rows) for rows in requests)
    assert engine.stats()[MODEL]["graph_batches"] == 0  # no CUDA graphs here


@pytest.mark.anyio
async def test_batches_fit_the_budget_in_the_shape_the_model_pads_them_to(
    engine_factory: Any,
) -> None:
    """A model that pads batches to shapes (a GPU's): across the process boundary the
    engine learns its padding, forms batches whose padded shape is within
    MAX_BATCH_TOKENS (16 rows x 64 tokens here; counting items x longest, 17 items of
    up to 59 tokens would fit, and run as 17 x 64), and counts the shape's tokens and
    the passes that replayed a CUDA graph."""
    grid = (1, 2, 4, 8, 16)
    padding = {"rows": grid, "step": 32, "long_step": 32, "long_from": 1024}
    engine, record = await engine_factory(
        delay=0.05, padding=padding, max_batch_tokens=1024, graph=True
    )
    requests = [[ids(*[r + 1] * (40 + r % 20))] for r in range(80)]  # 40-59 tokens
    await asyncio.gather(*(engine.submit(MODEL, rows) for rows in requests))
    batches = recorded(record)
    rule = Padding(grid, 32, 32, 1024)
    shapes = [rule.shape(len(batch), max(n for _, n in batch)) for batch in batches]
    assert all(rows * length <= 1024 for rows, length in shapes), shapes
    assert max(len(batch) for batch in batches) == 16  # full shapes still
    stats = engine.stats()[MODEL]
    assert stats["padded_tokens"] == sum(rows * length for rows, length in shapes)
    assert stats["graph_batches"] == stats["batches"] == len(batches)  # the model said so


@pytest.mark.anyio
async def test_lone_request_runs_at_once(engine_factory: Any) -> None:
    engine, _ = await engine_factory()
    await engine.submit(MODEL, [ids(1, 2, 3)])  # the first call pays for connecting
    started = time.perf_counter()
    await engine.submit(MODEL, [ids(1, 2, 3)])
    assert time.perf_counter() - started < 0.05


@pytest.mark.anyio
async def test_cancelled_request_is_not_computed(engine_factory: Any) -> None:
    engine, record = await engine_factory(delay=0.1)
    # Lengths too different to share a batch: two batches in flight, the next one waits.
    busy = [
        asyncio.ensure_future(engine.submit(MODEL, [ids(*[i] * n)])) for i, n in ((1, 1), (2, 99))
    ]
    await asyncio.sleep(0.02)
    doomed = asyncio.ensure_future(engine.submit(MODEL, [ids(666)] * 5))
    await asyncio.sleep(0.01)
    doomed.cancel()
    await asyncio.gather(*busy)
    await engine.submit(MODEL, [ids(3)])
    assert all(row[0] != 666 for batch in recorded(record) for row in batch)
    assert engine.queued_tokens(MODEL) == 0


@pytest.mark.anyio
async def test_full_queue_refuses_at_once(engine_factory: Any) -> None:
    engine, _ = await engine_factory(delay=0.1, max_queue_tokens=50, max_batch_tokens=50)
    running = [
        asyncio.ensure_future(engine.submit(MODEL, [ids(*[i] * n)])) for i, n in ((1, 1), (2, 10))
    ]
    await asyncio.sleep(0.02)
    waiting = asyncio.ensure_future(engine.submit(MODEL, [ids(*[2] * 40)]))  # queued
    await asyncio.sleep(0.01)
    with pytest.raises(ServiceError) as refused:
        await engine.submit(MODEL, [ids(*[3] * 20)])
    assert refused.value.kind is ErrorKind.OVERLOADED
    await asyncio.gather(*running, waiting)


@pytest.mark.anyio
async def test_failed_batch_fails_only_its_requests(engine_factory: Any) -> None:
    poison = char_ids("☠")[0]
    engine, _ = await engine_factory(delay=0.02, max_batch_size=1, triggers={"☠": "oom"})
    results = await asyncio.gather(
        engine.submit(MODEL, [ids(12)]),
        engine.submit(MODEL, [ids(poison)]),
        engine.submit(MODEL, [ids(14)]),
        return_exceptions=True,
    )
    first, error, last = results
    assert isinstance(error, ServiceError) and error.kind is ErrorKind.MODEL_FAILURE
    assert "20.00 GiB" not in error.message  # no internals in the reply
    assert not isinstance(first, BaseException) and not isinstance(last, BaseException)
    assert first[0, 0] == 12 and last[0, 0] == 14
    assert (await engine.submit(MODEL, [ids(15)]))[0, 0] == 15  # still serving


@pytest.mark.anyio
async def test_a_dying_engine_leaves_nothing_counted_in_its_queue(engine_factory: Any) -> None:
    """The requests queued when the engine process dies fail, and the queue counts them
    out once: its counters used to go below zero (every failed request counted its items
    out again), which broke len(queue), /metrics and the MAX_QUEUE_TOKENS check."""
    die = char_ids("✝")[0]
    engine, _ = await engine_factory(delay=0.2, max_batch_size=1, triggers={"✝": "die"})
    running = asyncio.ensure_future(engine.submit(MODEL, [ids(die)]))  # ends the process
    queued = [asyncio.ensure_future(engine.submit(MODEL, [ids(*[i] * 10)])) for i in (2, 3, 4)]
    await asyncio.sleep(0.05)
    assert engine.queued_items >= 2  # waiting behind the pass that will die
    results = await asyncio.wait_for(asyncio.gather(running, *queued, return_exceptions=True), 10)
    assert all(isinstance(error, ServiceError) for error in results), results
    # The pass that was running failed (500); the batch sent behind it never ran, like
    # those still queued (503, retry: it had been told 500 too, seen failing).
    kinds = [error.kind for error in results if isinstance(error, ServiceError)]
    assert kinds == [ErrorKind.MODEL_FAILURE] + [ErrorKind.NOT_READY] * 3, kinds
    # Only the pass that ran failed on the model (/ready's "failing" counts these).
    assert engine.stats()[MODEL]["failed_batches"] == 1
    queue = engine.lane(MODEL).queue
    assert (queue.items, queue.tokens, len(queue), engine.queued_tokens(MODEL)) == (0, 0, 0, 0)
    for _ in range(600):  # back within 30 s
        if engine.state == "ready":
            break
        await asyncio.sleep(0.05)
    assert (await engine.submit(MODEL, [ids(9)]))[0, 0] == 9  # back, and counting right
    assert engine.queued_tokens(MODEL) == 0


@pytest.mark.anyio
async def test_a_restarted_engine_starts_with_no_failures(engine_factory: Any) -> None:
    """/ready says "failing" after FAILING_AFTER failed batches until one succeeds; a new
    engine process starts afresh. Carried over, it had kept /ready at 503 after a crash,
    and a pod that /ready keeps out of its Service gets no request to clear it."""
    poison, die = char_ids("☠")[0], char_ids("✝")[0]
    engine, _ = await engine_factory(
        delay=0.02, max_batch_size=1, triggers={"☠": "raise", "✝": "die"}
    )
    for _ in range(3):
        with pytest.raises(ServiceError):
            await engine.submit(MODEL, [ids(poison)])
    assert engine.readiness()[0] == "failing"
    with pytest.raises(ServiceError):
        await asyncio.wait_for(engine.submit(MODEL, [ids(die)]), 10)
    for _ in range(600):  # back within 30 s
        if engine.state == "ready":
            break
        await asyncio.sleep(0.05)
    assert engine.readiness() == ("ready", None)  # with no request served since


@pytest.mark.anyio
async def test_a_dead_engine_is_noticed_while_asyncios_thread_pool_is_busy(
    engine_factory: Any,
) -> None:
    """Slow work in asyncio's shared thread pool (TEI's /tokenize of long texts) held up
    noticing a dead engine: reaping it waited for a free thread of that pool, and its
    requests were answered, and /ready turned, only then (20 s in an audit)."""
    die = char_ids("✝")[0]
    engine, _ = await engine_factory(delay=0.2, triggers={"✝": "die"})
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(1))
    release = threading.Event()
    busy = loop.run_in_executor(None, release.wait, 30)  # the pool's one thread, taken
    try:
        started = time.monotonic()
        with pytest.raises(ServiceError) as failed:
            await asyncio.wait_for(engine.submit(MODEL, [ids(die)]), 20)
        assert failed.value.kind is ErrorKind.MODEL_FAILURE
        assert time.monotonic() - started < 5
        for _ in range(400):  # back within 20 s, the pool still taken
            if engine.state == "ready":
                break
            await asyncio.sleep(0.05)
        assert (await engine.submit(MODEL, [ids(9)]))[0, 0] == 9
        assert not busy.done()
    finally:
        release.set()
        await busy


@pytest.mark.anyio
async def test_a_worker_given_up_while_it_starts_is_ended_at_once(tmp_path: Path) -> None:
    """A start cancelled while the process loads (shutdown during start-up, a restart
    past its time) left the process running until the server's own process exited."""
    engine = Engine(Settings(warmup=False), fake_plugin(load_seconds=60), str(tmp_path))
    starting = asyncio.ensure_future(engine.start())
    for _ in range(400):  # until its process has been forked
        if engine._process is not None and engine._process.pid is not None:
            break
        await asyncio.sleep(0.05)
    assert engine._process is not None and engine._process.pid is not None
    pid = engine._process.pid
    await asyncio.sleep(0.5)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    with pytest.raises(ProcessLookupError):  # ended and reaped
        os.kill(pid, 0)


def test_many_dify_users_share_batches_over_http() -> None:
    """32 concurrent one-text requests (Dify's shape): shared batches, own vectors."""
    settings = Settings(warmup=False)
    app = build_app(settings, fake_plugin(delay=0.05))
    texts = [f"ユーザー{i}の文書です" for i in range(32)]

    async def scenario(base_url: str) -> list[list[float]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            replies = await asyncio.gather(
                *(client.post("/v1/embeddings", json={"input": [t]}) for t in texts)
            )
            assert all(r.status_code == 200 for r in replies)
            info = (await client.get("/info")).json()
        assert info["engine"][MODEL]["mean_batch_size"] >= 4
        return [r.json()["data"][0]["embedding"] for r in replies]

    with serve_app(app) as server:
        vectors = asyncio.run(scenario(server.base_url))
    for text, vector in zip(texts, vectors, strict=True):
        np.testing.assert_allclose(vector, fake_text_vector(text), rtol=1e-6)


def test_a_large_request_is_cut_into_small_chunks_first_then_doubling_ones() -> None:
    assert FIRST_CHUNK == 8 and TOKENIZE_CHUNK == 64
    assert chunk_sizes(64, 8, 8) == [64]  # up to 64: one chunk
    assert chunk_sizes(512, 8, 8) == [8] * 8 + [16] * 8 + [32] * 8 + [64]
    assert chunk_sizes(512, 2, 8) == [8, 8, 16, 16, 32, 32] + [64] * 6 + [16]
    assert chunk_sizes(65, 1, 8) == [8, 16, 32, 9]
    assert chunk_sizes(1000, 0, 8) == chunk_sizes(1000, 1, 8)  # no tokenizer alive: as one
    assert chunk_sizes(200) == [64, 64, 64, 8]  # by default, chunks of 64
    for count in range(65, 2000, 37):
        for parallel in (1, 2, 3, 8):
            sizes = chunk_sizes(count, parallel, 8)
            assert sum(sizes) == count and max(sizes) <= TOKENIZE_CHUNK


@pytest.mark.anyio
@pytest.mark.parametrize("parallel", [2, 0])
async def test_a_large_request_tokenizes_as_many_chunks_at_once_as_there_are_tokenizers(
    parallel: int,
) -> None:
    """Its other chunks wait in the request, not in the tokenizers' queues (0: no bound,
    every chunk at once); each chunk still runs as soon as it is ready, outputs in order."""
    preparing = most = 0

    async def prepare(chunk: Sequence[int]) -> list[Encoded]:
        nonlocal preparing, most
        preparing += 1
        most = max(most, preparing)
        await asyncio.sleep(0.001)
        preparing -= 1
        return [Encoded.of([n]) for n in chunk]

    async def run(encoded: list[Encoded]) -> FloatArray:
        return np.array([[item.ids[0]] for item in encoded], dtype=np.float32)

    rows = await pipeline(prepare, list(range(1000)), run, chunk_sizes(1000, 2, 8), parallel)
    assert rows[:, 0].tolist() == list(range(1000))
    assert most == (2 if parallel else len(chunk_sizes(1000, 2, 8)))


def test_requests_that_left_are_not_tokenized_ahead_of_the_next_ones() -> None:
    """300 clients send 32 texts each and leave a second later (a timeout storm), with
    two tokenizer processes at 1 ms a text: their texts wait in the server, not in the
    processes, and go with their requests; a request sent then is answered at once (it
    waited 3.7 s behind the 9,600 texts of requests that had gone, seen failing)."""
    settings = Settings(warmup=False, tokenizer_workers=2)
    app = build_app(settings, fake_plugin(tokenizer_ms_per_text=1.0))

    async def storm(host: str, port: int) -> None:
        async def client(number: int) -> None:
            _, writer = await asyncio.open_connection(host, port)
            body = json.dumps({"input": [f"客{number}-{k}" for k in range(32)]}).encode()
            head = (
                "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            await asyncio.sleep(1.0)
            writer.close()

        await asyncio.gather(*(client(number) for number in range(300)))

    with serve_app(app) as server, server.client() as http:
        assert http.post("/v1/embeddings", json={"input": "前"}).status_code == 200
        host, port = server.base_url.removeprefix("http://").split(":")
        asyncio.run(storm(host, int(port)))
        started = time.perf_counter()
        reply = http.post("/v1/embeddings", json={"input": ["直後"] * 10})
        waited = time.perf_counter() - started
        assert reply.status_code == 200
    assert waited < 1.0, waited


def test_a_one_text_request_is_tokenized_while_a_bulk_request_is() -> None:
    """A query arriving while 2 tokenizer processes work through a bulk request of 2,000
    texts (2 ms a text: 2 s in all) waits for one chunk at most, not for every chunk
    queued ahead of it (seen to fail with every chunk sent at once: ~1.7 s)."""
    settings = Settings(tokenizer_workers=2, max_inputs=2048)
    app = build_app(settings, fake_plugin(tokenizer_ms_per_text=2))
    bulk = [f"大量の文書の{i}番目" for i in range(2000)]

    async def scenario(base_url: str) -> tuple[float, float]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            started = time.perf_counter()
            running = asyncio.ensure_future(client.post("/v1/embeddings", json={"input": bulk}))
            await asyncio.sleep(0.3)
            sent = time.perf_counter()
            reply = await client.post("/v1/embeddings", json={"input": "今日の天気は?"})
            single = time.perf_counter() - sent
            assert reply.status_code == 200 and (await running).status_code == 200
            return single, time.perf_counter() - started

    with serve_app(app) as server:
        single, bulk_seconds = asyncio.run(scenario(server.base_url))
    assert bulk_seconds > 1.5, bulk_seconds  # 2,000 texts at 2 ms on 2 processes
    assert single < 0.45, (single, bulk_seconds)  # a chunk of 64 texts takes 0.13 s


@pytest.mark.parametrize("on_gpu", [True, False], ids=["gpu", "cpu"])
def test_a_large_request_reaches_the_model_after_its_first_small_chunks(
    tmp_path: Path, on_gpu: bool
) -> None:
    """Texts of a large request reach the model chunk by chunk. With the model on a GPU,
    the first round of chunks (one per tokenizer process) is FIRST_CHUNK texts, so the
    first forward pass waits for 8 texts' tokenizing, not 64's (the time a GPU idled
    before each bulk request); on a CPU, where the model shares the cores, chunks stay
    64 texts. Every text still gets its own vector, in order."""
    record = tmp_path / "batches.jsonl"
    settings = Settings(warmup=False, tokenizer_workers=2)
    options: dict[str, Any] = {"record": str(record), "tokenizer_ms_per_text": 2}
    if on_gpu:
        options["gpu"] = [1.0, 0.01]  # ms per pass, per token
    app = build_app(settings, fake_plugin(**options))
    texts = [f"大きな依頼の{i}番目の文書" for i in range(300)]

    with serve_app(app) as server:
        reply = httpx.post(f"{server.base_url}/v1/embeddings", json={"input": texts}, timeout=60)
        info = httpx.get(f"{server.base_url}/info").json()
    assert reply.status_code == 200
    for text, item in zip(texts, reply.json()["data"], strict=True):
        np.testing.assert_allclose(item["embedding"], fake_text_vector(text), rtol=1e-6)
    passes = recorded(record)
    assert sum(len(rows) for rows in passes) == len(texts)
    if on_gpu:
        assert info["models"][MODEL]["device"].startswith("cuda")
        # Both processes' first chunks of 8 at most (it was a chunk of 64: seen to fail).
        assert len(passes[0]) <= 16
    else:
        assert len(passes[0]) >= 64


@pytest.mark.parametrize(
    ("text", "token_ms"),
    [("大量の文書の{}番目。" + "あ" * 90, 0.01), ("項目{}", 0.1)],
    ids=["texts-of-100-tokens", "texts-of-8-tokens"],
)
def test_a_one_text_request_is_answered_while_a_bulk_request_runs(
    text: str, token_ms: float
) -> None:
    """Dify's one-text query arriving while a client's bulk request of 2,000 texts runs
    (on an emulated GPU: 2 ms a pass plus ``token_ms`` a token, paced at twice that): it
    waits for about a batch, not for the whole bulk request (seen to fail with first
    come, first served: it was answered after the bulk request). Short texts fill a
    batch on items (64) long before its tokens: counted by their tokens alone, 2,000 of
    8 tokens were all within the first batch's worth (seen to fail)."""
    settings = Settings(max_inputs=2048)
    app = build_app(settings, fake_plugin(gpu=[2.0, token_ms], max_length=128))
    bulk = [text.format(i) for i in range(2000)]

    async def scenario(base_url: str) -> tuple[float, float, float]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            started = time.perf_counter()

            async def timed(texts: list[str]) -> float:
                reply = await client.post("/v1/embeddings", json={"input": texts})
                assert reply.status_code == 200, reply.text
                assert len(reply.json()["data"]) == len(texts)
                return time.perf_counter() - started

            running = asyncio.ensure_future(timed(bulk))
            await asyncio.sleep(0.5)  # the bulk request's items are queued
            single = await timed(["今日の天気は?"])
            return 0.5, single, await running

    with serve_app(app) as server:
        sent, single, bulk_done = asyncio.run(scenario(server.base_url))
    # ~2 s of passes in all: the single text came back long before the bulk request.
    assert bulk_done > 1.5, bulk_done
    assert single - sent < 0.35 * (bulk_done - sent), (single - sent, bulk_done)


@pytest.mark.anyio
async def test_reports_how_long_each_item_waited_for_the_model(engine_factory: Any) -> None:
    """The queue wait an autoscaler reads: ~0 for a request the engine can take at once,
    about a forward pass for one that arrived while the engine's pipeline was full."""
    reports: list[BatchReport] = []
    engine, _ = await engine_factory(delay=0.2, max_batch_size=1)
    engine.lane(MODEL).observer = reports.append
    first = asyncio.ensure_future(engine.submit(MODEL, [ids(1)]))
    await asyncio.sleep(0.05)  # the first pass is running: one slot of the pipeline left
    await asyncio.gather(first, engine.submit(MODEL, [ids(2), ids(3)]))
    waits = [report.queue_seconds for report in reports]
    assert [len(w) for w in waits] == [1, 1, 1]  # one per item, batches of one
    assert waits[0][0] < 0.05 and waits[1][0] < 0.05  # sent to the engine at once
    assert 0.1 < waits[2][0] < 0.4  # waited until the first pass was over
    # /info's sum of them (bench.run's mean queue wait)
    total = sum(sum(wait) for wait in waits)
    assert engine.stats()[MODEL]["queued_seconds"] == pytest.approx(total, abs=1e-3)


@pytest.mark.anyio
async def test_reports_how_long_the_model_had_nothing_in_the_engine(engine_factory: Any) -> None:
    """What tells a starved device from a busy one (bench.run reads it): the time with
    none of the model's batches in the engine process, counted up to the moment asked,
    and the batches that emptied the queue."""
    engine, _ = await engine_factory(delay=0.2, max_batch_size=1)
    await asyncio.sleep(0.1)
    before = engine.stats()[MODEL]
    assert before["starved_seconds"] >= 0.1  # idle since start-up, counted while idle
    await engine.submit(MODEL, [ids(1), ids(2), ids(3)])  # 3 passes of 0.2 s, 2 at a time
    await asyncio.sleep(0.1)
    after = engine.stats()[MODEL]
    starved = after["starved_seconds"] - before["starved_seconds"]
    assert 0.1 <= starved < 0.2  # the 0.1 s after the passes, not the ~0.6 s they ran
    assert after["batches"] - before["batches"] == 3
    # Taking the first two left items queued; the third took the last.
    assert after["drained_batches"] - before["drained_batches"] == 1


@pytest.mark.anyio
async def test_counts_drained_batches_among_the_batches_that_ran(engine_factory: Any) -> None:
    """drained_batches is a part of batches (bench.run divides one by the other): a batch
    that failed counts in neither, as its queue wait counts nowhere either."""
    engine, _ = await engine_factory(delay=0.05, max_batch_size=1, triggers={"☠": "raise"})
    before = engine.stats()[MODEL]
    fatal = ids(*char_ids("☠"))
    with pytest.raises(ServiceError):
        await engine.submit(MODEL, [fatal])  # alone in the queue: it took the last item
    after = engine.stats()[MODEL]
    assert after["failed_batches"] - before["failed_batches"] == 1
    assert after["batches"] == before["batches"]
    assert after["drained_batches"] == before["drained_batches"]
    await engine.submit(MODEL, [ids(1)])
    assert engine.stats()[MODEL]["drained_batches"] - after["drained_batches"] == 1


@pytest.mark.anyio
async def test_stopping_never_blocks_the_loop_and_answers_every_request(
    engine_factory: Any,
) -> None:
    """Issue 10: shutdown resolves every job, the running batch's too (503 once the engine
    process is ended), and the event loop keeps running meanwhile."""
    hang = char_ids("⌛")[0]
    engine, _ = await engine_factory(triggers={"⌛": "hang"}, max_batch_size=1)
    running = asyncio.ensure_future(engine.submit(MODEL, [ids(hang)]))  # never finishes
    behind = asyncio.ensure_future(engine.submit(MODEL, [ids(hang, 5)]))  # in the pipeline
    queued = asyncio.ensure_future(engine.submit(MODEL, [ids(7, 7, 7)]))  # in the queue
    await asyncio.sleep(0.3)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    started = time.perf_counter()
    await engine.stop()
    seconds = time.perf_counter() - started
    ticker.cancel()
    results = await asyncio.wait_for(
        asyncio.gather(running, behind, queued, return_exceptions=True), 5
    )
    for error in results:
        assert isinstance(error, ServiceError) and error.kind is ErrorKind.NOT_READY, error
    assert ticks >= seconds / 0.05 * 0.5, (ticks, seconds)  # the loop ran throughout


def test_metrics_count_the_passes_that_replayed_a_cuda_graph() -> None:
    from fake_openai_server.metrics import Metrics

    metrics = Metrics()
    observe = metrics.batch_observer(MODEL)
    observe(BatchReport(2, 10, 12, 0.01, graph=True))
    observe(BatchReport(3, 30, 30, 0.01))
    labels = {"model": MODEL}
    assert metrics.registry.get_sample_value("fos_batch_graphs_total", labels) == 1
    assert metrics.registry.get_sample_value("fos_batch_items_count", labels) == 2


@pytest.mark.anyio
async def test_calls_of_one_turn_reach_a_worker_in_one_write_and_before_stop(
    tmp_path: Path,
) -> None:
    """Many requests arriving together cost the server one system call to hand their
    work over, not one each; and a stop right after them still lets the worker answer
    them (they go out before STOP)."""
    from fake_openai_server.engine.process import EngineProcess

    process = EngineProcess(Settings(warmup=False), fake_plugin(echo=True), str(tmp_path))
    await process.load()
    writes: list[int] = []
    writer = process._writer
    assert writer is not None
    send = writer.writelines

    def counted(frames: Any) -> None:
        frames = list(frames)
        writes.append(len(frames))
        send(frames)

    writer.writelines = counted  # type: ignore[method-assign]
    first = [process.run(0, [ids(value)]) for value in (1, 2, 3, 4, 5)]
    await asyncio.gather(*first)
    last = [process.run(0, [ids(value)]) for value in (7, 8)]
    await process.stop()
    answers = [(await future).rows[0, 0] for future in first + last]
    assert answers == [1, 2, 3, 4, 5, 7, 8]
    assert writes == [5, 2]


@pytest.mark.anyio
async def test_a_failed_write_fails_exactly_the_calls_it_carried(tmp_path: Path) -> None:
    """The socket to a worker refusing a write (it closed under us) answers the calls of
    that write with WorkerGone at once, instead of leaving them waiting; calls written
    before and after are answered as usual."""
    from fake_openai_server.engine.process import EngineProcess
    from fake_openai_server.workers import WorkerGone

    process = EngineProcess(Settings(warmup=False), fake_plugin(echo=True), str(tmp_path))
    await process.load()
    writer = process._writer
    assert writer is not None
    send = writer.writelines
    try:
        assert (await process.run(0, [ids(1)])).rows[0, 0] == 1

        def refused(frames: Any) -> None:
            raise ConnectionResetError("the worker's socket closed")

        writer.writelines = refused  # type: ignore[method-assign]
        lost = [process.run(0, [ids(value)]) for value in (2, 3)]
        for future in lost:
            with pytest.raises(WorkerGone):
                await asyncio.wait_for(future, 5)
        writer.writelines = send  # type: ignore[method-assign]
        assert (await process.run(0, [ids(4)])).rows[0, 0] == 4
    finally:
        await process.stop()


def _children() -> set[int]:
    """This process's children, running or not yet reaped."""
    me, found = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me:  # after the name: state, then the parent's pid
                found.add(int(stat.parent.name))
    return found


@pytest.mark.anyio
async def test_a_worker_stopped_while_it_forks_leaves_no_process_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop during a restart can cancel a worker's start while its process is being
    forked (in a thread, a large process forking slowly): the process that fork makes is
    ended with it, instead of outliving the server."""
    import subprocess

    from fake_openai_server.engine.process import EngineProcess

    popen = subprocess.Popen

    def slow_to_return(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        process = popen(*args, **kwargs)
        time.sleep(0.5)  # forked; the thread has yet to hand the process back
        return process

    monkeypatch.setattr(subprocess, "Popen", slow_to_return)
    before = _children()
    process = EngineProcess(Settings(warmup=False), fake_plugin(echo=True), str(tmp_path))
    loading = asyncio.ensure_future(process.load())
    await asyncio.sleep(0.2)  # inside the fork's thread
    loading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loading
    await asyncio.sleep(0.5)
    assert _children() - before == set()


@pytest.mark.anyio
async def test_an_answer_that_cannot_be_read_ends_the_worker_not_its_callers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's answer the server cannot decode ends that worker (it is replaced as if
    it had died); its callers are answered instead of waiting forever."""
    from fake_openai_server.engine.process import EngineProcess
    from fake_openai_server.workers import WorkerGone

    process = EngineProcess(Settings(warmup=False), fake_plugin(echo=True), str(tmp_path))
    await process.load()

    def garbled(kind: int, body: bytes) -> tuple[int, Any]:
        raise ValueError("an answer of the wrong shape")

    monkeypatch.setattr(process, "decode", garbled)
    try:
        with pytest.raises(WorkerGone):
            await asyncio.wait_for(process.run(0, [ids(1)]), 10)
        assert not process.alive
    finally:
        await process.stop()
