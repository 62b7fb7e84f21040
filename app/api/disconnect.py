"""Stops work for clients that went away: a request's service call is cancelled when its client
disconnects, so queued pairs are dropped before they reach the model."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from app.errors import ClientGone

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the ASGI server reports `http.disconnect` first.

    The body has been read by then, so the next message on the channel is the disconnect (or
    nothing until the response is sent); uvicorn does not cancel handlers by itself.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientGone("the client disconnected before its answer was ready") from None
        raise
    finally:
        watcher.cancel()
