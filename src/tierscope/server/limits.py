"""What keeps the block server's memory bounded whatever clients do.

A response holds its frames from the moment its blocks load until its client has read them. A client
that asks and never reads would otherwise pin them, and the joined body a response used to copy them
into, for as long as its connection lives: 150 such batch requests once took the server from 171 MB
to 4 GB. So:

- answers are streamed frame by frame under the transport's flow control, never joined into one body,
  and a client that takes no bytes for ``WRITE_TIMEOUT_S`` is disconnected;
- ``ByteBudget`` bounds the bytes responses hold that nobody else does: a request is charged its blocks'
  raw size while they load (it waits for room, at most ``BUSY_WAIT_S``, then gets a 503), then only the
  frames L3 does not also hold, each released as soon as it is written. Frames L3 holds cost nothing
  more, so many clients reading the same cached blocks never wait on each other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Sequence

from aiohttp import web

from tierscope.errors import TierscopeError

__all__ = ["BUSY_WAIT_S", "RESPONSE_BUDGET", "WRITE_TIMEOUT_S", "ByteBudget", "Charge", "ServerBusyError",
           "stream", "stream_each"]

RESPONSE_BUDGET = 256 << 20  # one full batch of 1 MiB blocks at a time, at worst
BUSY_WAIT_S = 30.0
WRITE_TIMEOUT_S = 5.0  # a real client on the slowest link takes a chunk in milliseconds
CHUNK = 256 << 10  # a stalled connection's transport buffers at most about this much


class ServerBusyError(TierscopeError):
    """The response budget stayed taken for ``BUSY_WAIT_S``: try again later (503)."""


class Charge:
    """One response's share of the budget; it only ever shrinks."""

    def __init__(self, budget: ByteBudget, nbytes: int) -> None:
        self._budget, self.nbytes = budget, nbytes

    def shrink(self, nbytes: int) -> None:
        """Hold at most ``nbytes`` from now on."""
        freed = self.nbytes - max(0, min(nbytes, self.nbytes))
        if freed:
            self.nbytes -= freed
            self._budget.release(freed)


class ByteBudget:
    """Bytes held by responses in progress, bounded; used on the server's event loop only."""

    def __init__(self, capacity: int = RESPONSE_BUDGET, wait_s: float = BUSY_WAIT_S) -> None:
        self.capacity, self.wait_s = capacity, wait_s
        self.used = 0
        self._waiting = 0
        self._freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[Charge]:
        """Charge ``nbytes`` (at most the whole budget) while the block runs; what is left is freed after."""
        nbytes = min(max(nbytes, 0), self.capacity)
        if self.used + nbytes > self.capacity:
            self._waiting += 1
            try:
                async with asyncio.timeout(self.wait_s), self._freed:
                    await self._freed.wait_for(lambda: self.used + nbytes <= self.capacity)
            except TimeoutError:
                raise ServerBusyError(
                    f"the server is busy: responses in progress hold its {self.capacity >> 20} MiB "
                    "response budget; try again"
                ) from None
            finally:
                self._waiting -= 1
        self.used += nbytes
        charge = Charge(self, nbytes)
        try:
            yield charge
        finally:
            charge.shrink(0)

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        if self._waiting:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()


async def stream(
    request: web.Request,
    chunks: Sequence[tuple[bytes, int]],
    charge: Charge,
    content_type: str,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Send the ``(bytes, charged)`` chunks as one body under the transport's flow control, freeing each
    chunk's charge once written; a client that takes nothing for ``WRITE_TIMEOUT_S`` is disconnected."""
    response = web.StreamResponse(headers=headers)
    response.content_type = content_type
    response.content_length = sum(len(c) for c, _ in chunks)
    charge.shrink(sum(n for _, n in chunks))
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(WRITE_TIMEOUT_S) as deadline:
            await response.prepare(request)  # a client gone already fails here
            # a HEAD answer is the headers alone: aiohttp would send a stream's body, which the client
            # then reads as the start of its next answer on the connection
            for data, charged in chunks if request.method != "HEAD" else ():
                view = memoryview(data)
                for start in range(0, len(view), CHUNK):
                    await response.write(view[start : start + CHUNK])
                    deadline.reschedule(loop.time() + WRITE_TIMEOUT_S)  # it took bytes: not stalled
                charge.shrink(charge.nbytes - charged)
            await response.write_eof()
    except (TimeoutError, ConnectionResetError):  # a stalled or gone client: drop its connection
        if request.transport is not None:
            request.transport.abort()
    return response


async def stream_each(
    request: web.Request,
    chunks: AsyncIterable[tuple[bytes, int]],
    charge: Charge,
    content_type: str,
) -> web.StreamResponse:
    """``stream`` for chunks that become ready one by one (chunked transfer: no length up front), each sent
    as soon as it is ready; after each, ``freed`` bytes of the charge go. Only writing is timed: waiting
    for the next chunk is the server's own work, not a stalled client."""
    response = web.StreamResponse()
    response.content_type = content_type
    try:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await response.prepare(request)  # a client gone already fails here
        async for data, freed in chunks:
            view = memoryview(data)
            for start in range(0, len(view), CHUNK):
                async with asyncio.timeout(WRITE_TIMEOUT_S):
                    await response.write(view[start : start + CHUNK])
            charge.shrink(charge.nbytes - freed)
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await response.write_eof()
    except (TimeoutError, ConnectionResetError):  # a stalled or gone client: drop its connection
        if request.transport is not None:
            request.transport.abort()
    return response
