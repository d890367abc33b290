"""What a route needs from around its request: the runtime, and a reply in time.

``answer_in_time`` bounds a route's work by REQUEST_TIMEOUT and by the client staying
connected, and cancels the work (with its queued items) when either runs out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from fake_openai_server.api.errors import ClientGone
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.runtime import Runtime

T = TypeVar("T")

# How long a request runs before the server starts watching for its client leaving.
WATCH_AFTER = 0.05


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def answer_in_time(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and its queued items) if the client goes away or
    REQUEST_TIMEOUT passes first (then the reply is 504).

    ``work`` runs in the request's own task. If it is still running after
    ``WATCH_AFTER``, a watcher task starts that waits for the client to disconnect and
    cancels the request's task if it does: most requests are answered sooner and never
    pay for the watcher, and a client that leaves costs at most that much of its work.
    """
    timeout = runtime(request).settings.request_timeout
    request_task = asyncio.current_task()
    assert request_task is not None  # a route runs in its request's task
    gone = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        request_task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(watch())

    later = asyncio.get_running_loop().call_later(WATCH_AFTER, start_watching)
    try:
        async with asyncio.timeout(timeout):
            return await work
    except TimeoutError:
        raise ServiceError(
            ErrorKind.TIMEOUT,
            f"The request was not answered within REQUEST_TIMEOUT={timeout:g} seconds "
            "(the server is overloaded or the input is large); retry, or send fewer inputs.",
        ) from None
    except asyncio.CancelledError:
        if not gone:
            raise  # the server's own cancellation (shutdown): not ours to answer
        request_task.uncancel()
        raise ClientGone from None
    finally:
        later.cancel()
        if watcher is not None:
            watcher.cancel()
