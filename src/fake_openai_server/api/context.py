"""What a route needs from around its request: the runtime, and a reply in time.

``answer_in_time`` bounds a route's work by REQUEST_TIMEOUT and by the client staying
connected, and cancels the work (with its queued items) when either runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from fake_openai_server.api.errors import ClientGone
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.runtime import Runtime

T = TypeVar("T")


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer_in_time(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and its queued items) if the client goes away or
    REQUEST_TIMEOUT passes first (then the reply is 504)."""
    timeout = runtime(request).settings.request_timeout
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if not watcher.done():
            raise ServiceError(
                ErrorKind.TIMEOUT,
                f"The request was not answered within REQUEST_TIMEOUT={timeout:g} seconds "
                "(the server is overloaded or the input is large); retry, or send fewer inputs.",
            )
        raise ClientGone
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
