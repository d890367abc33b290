"""What a route needs from around its request: the runtime, and a reply in time.

``answer_in_time`` bounds a route's work by REQUEST_TIMEOUT and by the client staying
connected, and cancels the work (with its queued items) when either runs out.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from fake_openai_server.api.errors import ClientGone
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.runtime import Runtime

T = TypeVar("T")

# How long a request runs before the server starts watching for its client leaving (and
# for REQUEST_TIMEOUT). Longer than most requests take in a busy server (256 one-text
# clients on an H200: p50 0.17-0.20 s), so that under load as in quiet times most never
# pay for a watcher; a client that left sooner still has its queued work dropped then.
WATCH_AFTER = 0.5


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def answer_in_time(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and its queued items) if the client goes away or
    REQUEST_TIMEOUT passes first (then the reply is 504), or the server's drain is nearly
    over (``Runtime.refuse_waiting``: 503 "shutting down").

    ``work`` runs in the request's own task. A request answered within ``WATCH_AFTER``
    (most are) costs one timer and nothing else. One still running then gets a watcher
    task that waits, until REQUEST_TIMEOUT, for its client to disconnect, and cancels the
    request's task at whichever comes first: the queued work of a client that left is
    dropped by ``WATCH_AFTER`` at the latest (what reached the model by then still runs).
    """
    rt = runtime(request)
    if rt.refusing is not None:  # the drain's time is up
        if inspect.iscoroutine(work):
            work.close()
        raise rt.refusing
    timeout = rt.settings.request_timeout
    request_task = asyncio.current_task()
    assert request_task is not None  # a route runs in its request's task
    first = min(WATCH_AFTER, timeout)  # when watching starts (never after the timeout)
    why: type[ClientGone] | type[TimeoutError] | ServiceError | None = None
    watcher: asyncio.Task[None] | None = None

    def refuse(error: ServiceError) -> None:
        nonlocal why
        if why is None:
            why = error
            request_task.cancel()

    async def watch(remaining: float) -> None:
        nonlocal why
        try:
            async with asyncio.timeout(remaining):
                while (await request.receive())["type"] != "http.disconnect":
                    pass
            gone: type[ClientGone] | type[TimeoutError] = ClientGone
        except TimeoutError:
            gone = TimeoutError
        if why is None:  # not refused meanwhile
            why = gone
            request_task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(watch(timeout - first))

    later = asyncio.get_running_loop().call_later(first, start_watching)
    rt.answering.add(refuse)
    try:
        return await work
    except asyncio.CancelledError:
        if why is None:
            raise  # the server's own cancellation (shutdown): not ours to answer
        request_task.uncancel()
        if isinstance(why, ServiceError):
            raise why from None
        if why is ClientGone:
            raise ClientGone from None
        raise ServiceError(
            ErrorKind.TIMEOUT,
            f"The request was not answered within REQUEST_TIMEOUT={timeout:g} seconds "
            "(the server is overloaded or the input is large); retry, or send fewer inputs.",
        ) from None
    finally:
        rt.answering.discard(refuse)
        later.cancel()
        if watcher is not None:
            watcher.cancel()
