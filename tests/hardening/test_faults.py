"""Faults injected on purpose (issue 10): the engine never leaves a request waiting.

The fake models (``tests/support/fakes.py``) run in the real engine process and misbehave
when a batch holds a trigger character: raise, run out of memory, return too few or too
many rows or NaN, hang, or kill their own process. Each test checks what the requests
involved get (status and envelope), that unrelated requests succeed, that ``/ready``
tells the truth, and that nothing waits longer than its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fake_openai_server.api.app import build_app
from fake_openai_server.api.context import WATCH_AFTER
from fake_openai_server.engine.core import BatchReport
from fake_openai_server.engine.process import EngineProcess
from fake_openai_server.service import tokenizing
from fake_openai_server.settings import Settings
from tests.support.fakes import fake_plugin, fake_text_vector
from tests.support.live import LiveServer, fake_cli, serve_app

FAULTS = {
    "☠": "raise",
    "Ⓜ": "oom",
    "⊖": "too_few",
    "⊕": "too_many",
    "∅": "nan",
    "〇": "zero",
    "⌛": "hang",
    "✝": "die",
}
DELAY = 0.3  # seconds per forward pass
DEADLINE = 3.0  # REQUEST_TIMEOUT
STALL = 4.0  # STALL_TIMEOUT: a hung pass outlives the deadline, then the engine is replaced
BUSY = ["先", "長い" * 10]  # two batches (lengths too different to share one) fill the pipeline


def ready(base_url: str) -> tuple[int, dict[str, Any]]:
    reply = httpx.get(f"{base_url}/ready", timeout=10)
    return reply.status_code, reply.json()


def wait_until_ready(base_url: str, timeout: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if ready(base_url)[0] == 200:
            return time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError(f"not ready again after {timeout}s: {ready(base_url)}")


@pytest.fixture(scope="module")
def faulty() -> Iterator[LiveServer]:
    settings = Settings(
        service_type="embeddings",
        warmup=False,
        request_timeout=DEADLINE,
        stall_timeout=STALL,
    )
    app = build_app(settings, fake_plugin(delay=DELAY, triggers=FAULTS))
    with serve_app(app) as server:
        yield server


async def together(
    base_url: str, texts: list[str], after_busy: bool = False
) -> list[tuple[httpx.Response, float]]:
    """One request per text, sent at once; replies and their times. With ``after_busy``,
    the BUSY requests go first and fill the engine's pipeline, so that ``texts`` queue
    behind them and share one batch."""
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:

        async def one(text: str) -> tuple[httpx.Response, float]:
            started = time.monotonic()
            reply = await client.post("/v1/embeddings", json={"input": text})
            return reply, time.monotonic() - started

        busy = [asyncio.ensure_future(one(text)) for text in BUSY] if after_busy else []
        if busy:
            await asyncio.sleep(DELAY / 3)
        replies = await asyncio.gather(*(one(text) for text in texts))
        for (reply, _), text in zip(await asyncio.gather(*busy), BUSY[: len(busy)], strict=True):
            assert_clean(reply, text)  # unrelated: served
        return list(replies)


def error_of(reply: httpx.Response, status: int, code: str) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code, error
    assert set(error) == {"message", "type", "param", "code"}
    assert "secret" not in reply.text and "GiB" not in reply.text
    return str(error["message"])


def assert_clean(reply: httpx.Response, text: str) -> None:
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["data"][0]["embedding"], fake_text_vector(text))


@pytest.mark.parametrize("fault", ["☠", "Ⓜ", "⊖", "⊕"])
def test_a_failing_batch_fails_its_requests_only(faulty: LiveServer, fault: str) -> None:
    base = faulty.base_url
    # The faulty text and a bystander share a batch: the whole batch fails.
    replies = asyncio.run(together(base, [f"毒{fault}", "隣人"], after_busy=True))
    for reply, _ in replies:
        message = error_of(reply, 500, "model_failure")
        if fault == "Ⓜ":
            assert "memory" in message and "MAX_BATCH_TOKENS" in message
    # A later request is served and the server is ready (one failure is not "failing").
    assert_clean(asyncio.run(together(base, ["その後"]))[0][0], "その後")
    assert ready(base)[0] == 200


@pytest.mark.parametrize("text", ["無∅", "零〇"], ids=["nan", "zero"])
def test_a_nan_or_zero_vector_fails_its_request_and_not_its_batch_mates(
    faulty: LiveServer, text: str
) -> None:
    """Never a NaN or all-zero vector in a 200: Dify normalises each vector itself, and a
    zero one becomes NaN there."""
    replies = asyncio.run(together(faulty.base_url, [text, "隣人"], after_busy=True))
    error_of(replies[0][0], 500, "model_failure")
    assert "NaN" not in replies[0][0].text
    assert_clean(replies[1][0], "隣人")


def test_a_hung_pass_answers_504_by_the_deadline_and_the_engine_is_replaced(
    faulty: LiveServer,
) -> None:
    base = faulty.base_url
    # Behind the busy batches, so that the two share one batch: sent to an idle engine,
    # the bystander sometimes arrived first, ran alone and was served (200).
    replies = asyncio.run(together(base, ["止まる⌛", "巻き添え"], after_busy=True))
    for reply, seconds in replies:
        message = error_of(reply, 504, "timeout")
        assert "REQUEST_TIMEOUT" in message
        assert seconds < DEADLINE + 2, seconds
    # The stalled engine process is killed and a new one started; /ready says so meanwhile.
    states = set()
    unready = []  # fos_ready while /ready said restarting (0, unless it just came back)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, body = ready(base)
        states.add(body["status"])
        if body["status"] == "restarting":
            unready.append(faulty.metric("fos_ready"))
        if status == 200 and "restarting" in states:
            break
        time.sleep(0.05)
    assert "restarting" in states, states
    assert 0.0 in unready, unready
    assert_clean(asyncio.run(together(base, ["復活"]))[0][0], "復活")
    assert "fos_engine_restarts_total 1.0" in httpx.get(f"{base}/metrics", timeout=10).text


def test_a_dying_engine_fails_what_it_held_and_comes_back(faulty: LiveServer) -> None:
    base = faulty.base_url
    # The busy batches finish; the dying one takes its bystander along. The bystander has
    # the dying text's length, so that the two share one batch (with "同乗", one token
    # shorter, they sometimes ran apart, the bystander first, and it was served: 200).
    replies = asyncio.run(together(base, ["死ぬ✝", "同乗者"], after_busy=True))
    for reply, seconds in replies:
        error_of(reply, 500, "model_failure")  # the batch that was running when it died
        assert seconds < DEADLINE, seconds
    assert wait_until_ready(base) < 30
    assert_clean(asyncio.run(together(base, ["再開"]))[0][0], "再開")


def test_an_observer_that_raises_never_stops_the_engine() -> None:
    app = build_app(Settings(service_type="embeddings", warmup=False), fake_plugin())

    def broken(model: str) -> Any:
        def observe(report: BatchReport) -> None:
            raise RuntimeError("metrics backend exploded")

        return observe

    app.state.runtime.engine.observers = broken
    with serve_app(app) as server:
        replies = asyncio.run(together(server.base_url, [f"文{i}" for i in range(10)]))
        for (reply, _), i in zip(replies, range(10), strict=True):
            assert_clean(reply, f"文{i}")
        assert ready(server.base_url)[0] == 200


def test_a_killed_tokenizer_process_costs_only_what_it_held() -> None:
    settings = Settings(service_type="embeddings", warmup=False, tokenizer_workers=2)
    app = build_app(settings, fake_plugin(tokenizer_delay=0.05))
    with serve_app(app) as server:
        base = server.base_url
        pool = app.state.runtime.tokenizers
        worker = pool.workers[0]
        victim = worker.pid
        # Long enough not to be tokenized on the event loop (INLINE_CHARS) — though with
        # tokenizer processes nothing is.
        texts = [f"文書{i}" + "あ" * 1000 for i in range(40)]

        async def under_load() -> tuple[list[tuple[httpx.Response, float]], list[Any]]:
            async def kill_soon() -> list[Any]:
                for _ in range(4000):  # until the victim holds several calls (20 s at most)
                    if worker.in_flight >= 3:
                        break
                    await asyncio.sleep(0.005)
                os.kill(victim, signal.SIGKILL)
                seen = []
                async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                    for _ in range(20):
                        seen.append((await client.get("/ready")).json())
                        await asyncio.sleep(0.02)
                return seen

            killer = asyncio.ensure_future(kill_soon())
            replies = await together(base, texts)
            return replies, await killer

        replies, seen = asyncio.run(under_load())
        failed = 0
        for (reply, _), text in zip(replies, texts, strict=True):
            if reply.status_code == 503:
                failed += 1
                assert "tokenizer process" in error_of(reply, 503, "model_not_ready")
            else:
                assert_clean(reply, text)
        assert 0 < failed < len(texts), failed  # what the dead process held, no more
        # /ready stayed 200 (requests are served) and said what happened.
        assert any("tokenizer processes" in body.get("detail", "") for body in seen), seen
        assert all(body["status"] == "ready" for body in seen)
        # Whole again within seconds, a new process in the dead one's place.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(pool.workers) < 2:
            time.sleep(0.05)
        assert len(pool.workers) == 2 and victim not in [w.pid for w in pool.workers]
        assert ready(base) == (200, {"status": "ready"})


def test_texts_a_timed_out_request_left_in_a_tokenizer_process_still_count() -> None:
    """A request that gave up (504) left its texts in a tokenizer process, which went on
    tokenizing them; its texts had stopped counting at once, so the next requests went to
    that busy process, behind them, and timed out too, while the other one sat idle."""
    settings = Settings(
        service_type="embeddings", warmup=False, tokenizer_workers=2, request_timeout=2
    )
    with serve_app(build_app(settings, fake_plugin(tokenizer_ms_per_text=100))) as server:
        base = server.base_url
        bulk = [f"大量{i}" for i in range(64)]  # one chunk: 6.4 s in one process
        reply = httpx.post(f"{base}/v1/embeddings", json={"input": bulk}, timeout=30)
        assert "REQUEST_TIMEOUT=2" in error_of(reply, 504, "timeout")
        for i in range(4):  # the bulk chunk has seconds to go in its process
            started = time.monotonic()
            reply = httpx.post(f"{base}/v1/embeddings", json={"input": f"後{i}"}, timeout=30)
            assert_clean(reply, f"後{i}")
            assert time.monotonic() - started < 1.5, i


def test_the_engines_working_directory_lives_as_long_as_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the app (``uvicorn --factory`` before its lifespan, a script that only
    reads the OpenAPI document, tests) made a fos-engine-* directory that only a served
    app's shutdown removed: /tmp collected them by the hundred."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    app = build_app(Settings(service_type="embeddings", warmup=False), fake_plugin())
    app.openapi()
    assert not list(tmp_path.glob("fos-engine-*"))
    with serve_app(app):
        assert len(list(tmp_path.glob("fos-engine-*"))) == 1
    assert not list(tmp_path.glob("fos-engine-*"))


def test_a_killed_servers_working_directory_is_removed_by_the_next_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server killed outright (SIGKILL, the OOM killer) cannot remove its fos-engine-*
    directory: each such restart left one in /tmp for good. The next server removes those
    whose server has ended (its lock is free), and no other: not a running server's, even
    one with this server's pid (a restarted container's server is pid 1 again), nor one
    without a lock, whatever its name."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    settings = {"service_type": "embeddings", "warmup": False}
    with fake_cli(settings, {}, tmp_path) as killed:
        assert killed.process is not None
        (left,) = scratch.glob("fos-engine-*")
        killed.process.kill()
        killed.process.wait()
    assert left.is_dir()
    # A running server's (its lock held by a live process here), and two without a lock.
    running = scratch / "fos-engine-running"
    running.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(running / ".lock")], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        odd = [scratch / "fos-engine-abcd1234", scratch / "fos-engine-99999999999999999999-x"]
        for folder in odd:
            folder.mkdir()
        with fake_cli(settings, {}, tmp_path):
            assert not left.exists()
            assert running.is_dir() and all(folder.is_dir() for folder in odd)
            assert len(list(scratch.glob("fos-engine-*"))) == 4  # with the new server's
    finally:
        holder.kill()
        holder.wait()
    assert len(list(scratch.glob("fos-engine-*"))) == 3  # a clean stop removes its own


# Holds an exclusive flock on the file named, as a running server holds its directory's.
HOLD_LOCK = """
import fcntl, os, sys, time
lock = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
fcntl.flock(lock, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_hung_tokenizer_process_is_ended_and_replaced() -> None:
    """A tokenizer process that stops answering (SIGSTOP here; a deadlock in the field)
    held the requests sent to it until REQUEST_TIMEOUT, and stayed for good. Now it is
    ended after STALL_TIMEOUT: its requests get a 503 to retry, and a new one takes its
    place."""
    settings = Settings(
        service_type="embeddings",
        warmup=False,
        tokenizer_workers=2,
        stall_timeout=1.0,
        request_timeout=60,
    )
    app = build_app(settings, fake_plugin())
    with serve_app(app) as server:
        pool = app.state.runtime.tokenizers
        victim = pool.workers[0].pid
        os.kill(victim, signal.SIGSTOP)
        texts = [f"停止{i}" for i in range(8)]  # spread over both processes
        replies = asyncio.run(together(server.base_url, texts))
        failed = 0
        for (reply, seconds), text in zip(replies, texts, strict=True):
            assert seconds < 10, seconds
            if reply.status_code == 503:
                failed += 1
                assert "tokenizer process" in error_of(reply, 503, "model_not_ready")
            else:
                assert_clean(reply, text)
        assert failed > 0  # the stopped process held some
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(pool.workers) < 2:
            time.sleep(0.05)
        assert len(pool.workers) == 2 and victim not in [w.pid for w in pool.workers]
        assert_clean(asyncio.run(together(server.base_url, ["再開"]))[0][0], "再開")


def test_a_busy_tokenizer_process_is_not_taken_for_a_hung_one() -> None:
    """Under a long backlog the oldest call waiting can be older than STALL_TIMEOUT while
    the process answers call after call: what counts is the time without an answer."""
    worker = tokenizing.TokenizerProcess({})
    loop = asyncio.new_event_loop()
    try:
        now = time.monotonic()
        worker.waiting = {loop.create_future(): now - 100, loop.create_future(): now - 1}
        worker.answered = now - 0.5  # it answered half a second ago
        assert worker.stalled_for(now) == pytest.approx(0.5)
        worker.answered = now - 200  # nothing since long before the calls came
        assert worker.stalled_for(now) == pytest.approx(100)
        worker.waiting = {}
        assert worker.stalled_for(now) == 0
    finally:
        loop.close()


def test_a_tokenizer_process_that_cannot_start_at_once_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The memory pressure that kills a tokenizer process can also refuse its replacement
    (fork fails): the pool tries again until it is whole, where it used to stay short."""
    settings = Settings(service_type="embeddings", warmup=False, tokenizer_workers=2)
    app = build_app(settings, fake_plugin())
    with serve_app(app) as server:
        pool = app.state.runtime.tokenizers
        start = tokenizing.TokenizerProcess.start
        refusals = [OSError(12, "Cannot allocate memory")] * 2

        async def refused_at_first(process: tokenizing.TokenizerProcess) -> None:
            if refusals:
                raise refusals.pop()
            await start(process)

        monkeypatch.setattr(tokenizing.TokenizerProcess, "start", refused_at_first)
        victim = pool.workers[0].pid
        os.kill(victim, signal.SIGKILL)

        def whole_again() -> bool:
            pids = [worker.pid for worker in pool.workers]
            return len(pids) == 2 and victim not in pids

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not whole_again():
            time.sleep(0.05)
        assert not refusals and whole_again()
        assert ready(server.base_url) == (200, {"status": "ready"})
        assert_clean(asyncio.run(together(server.base_url, ["再開"]))[0][0], "再開")


def test_an_engine_restart_that_fails_unforeseen_is_tried_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart can fail in a way no one listed (a thread that cannot start when memory is
    short raises RuntimeError): it is tried again, where the server had stayed
    'restarting' (503 on /ready, 200 on /health) for good, and shutting down had stopped
    at the failed restart, leaving the tokenizer processes running."""
    app = build_app(Settings(service_type="embeddings", warmup=False), fake_plugin())
    with serve_app(app) as server:
        engine = app.state.runtime.engine
        load = EngineProcess.load
        # Popped from the end: a start that timed out (its message is empty: the log
        # line had ended in nothing), then one that could not start a thread.
        refusals: list[Exception] = [RuntimeError("can't start new thread"), TimeoutError()]

        async def refused_at_first(process: EngineProcess) -> Any:
            if refusals:
                raise refusals.pop()
            return await load(process)

        monkeypatch.setattr(EngineProcess, "load", refused_at_first)
        victim = engine._process.pid
        with caplog.at_level(logging.ERROR):
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while not (engine.restarts == 1 and ready(server.base_url)[0] == 200):
                assert time.monotonic() < deadline, ready(server.base_url)
                time.sleep(0.05)
        assert not refusals and engine._process.pid != victim
        messages = [r.getMessage() for r in caplog.records]
        assert "engine restart 1 failed: TimeoutError" in messages, messages
        assert any("can't start new thread" in message for message in messages)
        assert_clean(asyncio.run(together(server.base_url, ["再開"]))[0][0], "再開")


def test_an_engine_that_cannot_come_back_ends_the_server(tmp_path: Path) -> None:
    """The first start works, every restart fails: the server exits non-zero (its
    supervisor starts a new one) instead of answering 503 forever."""
    options = {"fail_after_first_load": str(tmp_path / "loaded"), "triggers": {"✝": "die"}}
    settings = {"service_type": "embeddings", "warmup": False, "stall_timeout": 1}
    with fake_cli(settings, options, tmp_path) as server:
        reply = httpx.post(f"{server.base_url}/v1/embeddings", json={"input": "✝"}, timeout=30)
        assert reply.status_code == 500
        assert server.process is not None
        code = server.process.wait(timeout=60)
    assert code == 1
    assert "could not be restarted" in server.log()


def calibration(base_url: str) -> dict[str, Any]:
    """The served model's entry in GET /info/quantization."""
    models = httpx.get(f"{base_url}/info/quantization", timeout=10).json()["models"]
    (model,) = models.values()
    return dict(model)


def test_the_first_int8_request_waits_for_the_calibration_within_the_request_timeout() -> None:
    """With WARMUP=false the first int8 request starts the calibration (152 texts) and
    waits for it: a 504 at REQUEST_TIMEOUT, as for its own embedding, where it had waited
    the calibration's whole time. The calibration goes on for the next request."""
    timeout = 1.0
    settings = Settings(
        service_type="embeddings", warmup=False, request_timeout=timeout, max_batch_size=1
    )
    body = {"input": "量子化", "output_dtype": "int8"}
    # one text per forward pass, each 30 ms: the calibration takes ~4.6 s
    with serve_app(build_app(settings, fake_plugin(delay=0.03))) as server:
        started = time.monotonic()
        reply = httpx.post(f"{server.base_url}/v1/embeddings", json=body, timeout=30)
        seconds = time.monotonic() - started
        assert "REQUEST_TIMEOUT=1" in error_of(reply, 504, "timeout")
        assert timeout <= seconds < timeout + 1.5, seconds
        deadline = time.monotonic() + 30
        while (model := calibration(server.base_url))["state"] != "ready":
            assert model["state"] == "running" and time.monotonic() < deadline, model
            time.sleep(0.1)
        step = model["step"]
        reply = httpx.post(f"{server.base_url}/v1/embeddings", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        want = np.clip(np.rint(fake_text_vector("量子化") / np.float32(step)), -128, 127)
        assert reply.json()["data"][0]["embedding"] == want.astype(int).tolist()


def test_the_first_int8_request_waits_for_its_embedding_and_the_calibration_together() -> None:
    """Its embedding and then the calibration each had a REQUEST_TIMEOUT of their own: an
    embedding that took most of one was followed by a second wait (5.9 s against
    REQUEST_TIMEOUT=3 in an audit). Now one REQUEST_TIMEOUT holds for both."""
    timeout = 2.0
    settings = Settings(
        service_type="embeddings", warmup=False, request_timeout=timeout, max_batch_size=1
    )
    texts = [f"量子化{i}" for i in range(6)]  # 1.5 s of forward passes on their own
    with serve_app(build_app(settings, fake_plugin(delay=0.25))) as server:
        for path, body in [
            ("/v1/embeddings", {"input": texts, "output_dtype": "int8"}),
            (
                "/v2/embed",
                {"texts": texts, "input_type": "search_document", "embedding_types": ["uint8"]},
            ),
        ]:
            started = time.monotonic()
            reply = httpx.post(f"{server.base_url}{path}", json=body, timeout=30)
            seconds = time.monotonic() - started
            assert reply.status_code == 504, reply.text
            assert timeout <= seconds < timeout + 0.8, (path, seconds)


def test_a_request_timeout_shorter_than_the_watch_delay_holds() -> None:
    """REQUEST_TIMEOUT under WATCH_AFTER (the delay before a request is watched): the
    504 still comes at REQUEST_TIMEOUT, not when the watching starts."""
    timeout = 0.1
    settings = Settings(service_type="embeddings", warmup=False, request_timeout=timeout)
    with serve_app(build_app(settings, fake_plugin(delay=3.0))) as server:
        started = time.monotonic()
        reply = httpx.post(f"{server.base_url}/v1/embeddings", json={"input": "遅"}, timeout=10)
        seconds = time.monotonic() - started
    assert "REQUEST_TIMEOUT=0.1" in error_of(reply, 504, "timeout")
    assert timeout <= seconds < WATCH_AFTER - 0.1, seconds


def test_a_tei_timeout_is_overloaded_in_teis_envelope() -> None:
    """TEI's envelope names the kind of failure; a timeout is not a 'Validation' error."""
    settings = Settings(service_type="embeddings", warmup=False, request_timeout=0.1)
    with serve_app(build_app(settings, fake_plugin(delay=1.0))) as server:
        reply = httpx.post(f"{server.base_url}/embed", json={"inputs": "遅"}, timeout=10)
    assert reply.status_code == 504, reply.text
    assert reply.json()["error_type"] == "Overloaded", reply.text
