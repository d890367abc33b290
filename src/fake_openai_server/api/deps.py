"""Helpers shared by the route modules."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from starlette.responses import Response

from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.runtime import Runtime

T = TypeVar("T")

CLIENT_CLOSED = 499  # nginx's code for "client closed request"; nobody reads it


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


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


def client_gone_response() -> Response:
    return Response(status_code=CLIENT_CLOSED)
