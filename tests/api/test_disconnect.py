"""A client that goes away while its request is queued: the service call is cancelled (its pairs are
dropped before the forward pass) and the route ends with 499 instead of running on."""

from __future__ import annotations

import asyncio

import pytest

from app.api.disconnect import unless_disconnected
from app.errors import ClientGone


class FakeRequest:
    def __init__(self, disconnect: asyncio.Event):
        self.disconnect = disconnect

    async def receive(self):
        await self.disconnect.wait()
        return {"type": "http.disconnect"}


def test_work_is_cancelled_when_the_client_disconnects():
    async def main():
        gone = asyncio.Event()
        cancelled = asyncio.Event()

        async def queued_forever():
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        call = asyncio.ensure_future(unless_disconnected(FakeRequest(gone), queued_forever()))
        await asyncio.sleep(0)
        gone.set()
        with pytest.raises(ClientGone):
            await call
        return cancelled.is_set()

    assert asyncio.run(main()) is True


def test_work_that_finishes_first_is_returned():
    async def main():
        async def quick():
            return 42

        return await unless_disconnected(FakeRequest(asyncio.Event()), quick())

    assert asyncio.run(main()) == 42
