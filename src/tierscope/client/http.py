"""The HTTP transport: one keep-alive aiohttp session per process, shared by all threads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import aiohttp

from tierscope import _sync, config
from tierscope.client.source import Fetched, Transport
from tierscope.errors import (
    AuthenticationError,
    BlockIndexError,
    DatasetNotFoundError,
    ServerUnavailableError,
    StoreError,
    VariableNotFoundError,
)
from tierscope.grid import BlockIndex
from tierscope.metadata import DatasetInfo
from tierscope.protocol import LINK_HEADER, MAX_BATCH, MOVES_HEADER

__all__ = ["HttpTransport"]

# Errors the server reports by class name, re-raised here as the same class with the same message.
_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (DatasetNotFoundError, VariableNotFoundError, BlockIndexError, StoreError, ValueError)
}
# Every request tierscope makes only reads, so a failed one is safe to send again: after a connection
# error or a 502/503/504, wait and retry after each of tierscope.http.retry-delays (a restarted server
# is back within one delay or two).
_RETRY_STATUS = (502, 503, 504)
T = TypeVar("T")
_retries = 0  # in this process, for stats
# Answers of at least this many bytes measure the link (smaller ones measure mostly the round trip);
# each measurement moves the estimate by LINK_WEIGHT.
LINK_SAMPLE_BYTES = 16 << 10
LINK_WEIGHT = 0.2


def retries() -> int:
    """Requests this process sent again after a transient failure."""
    return _retries


async def _retried(attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()``, tried again after each of ``tierscope.http.retry-delays`` while it fails with
    ``_Transient``; the last failure's error is raised."""
    global _retries
    for delay in (*config.get("http.retry-delays"), None):
        try:
            return await attempt()
        except _Transient as transient:
            if delay is None:
                raise transient.error from transient.error.__cause__
            _retries += 1
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class _Transient(Exception):
    """A failure worth one more try; carries the error to raise when the tries run out."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _block_path(index: Sequence[int]) -> str:
    return ".".join(str(int(i)) for i in index)


def view_headers(session: str | None, position: Sequence[BlockIndex] | None) -> dict[str, str]:
    """The session and position request headers (docs/protocol.md) for a view."""
    headers = {}
    if session is not None:
        headers["X-Tierscope-Session"] = session
    if position:
        headers["X-Tierscope-Position"] = ";".join(_block_path(b) for b in position)
    return headers


def split_batch(body: bytes) -> list[tuple[tuple[int, ...], Fetched]]:
    """A batch response as (index, block) pairs: a JSON header line, then the frames back to back."""
    line, sep, rest = body.partition(b"\n")
    try:
        entries = json.loads(line)["blocks"] if sep else None
        sizes = [int(e[2]) for e in entries]
    except (ValueError, KeyError, TypeError, IndexError):
        entries = None
    if entries is None or sum(sizes) != len(rest):
        raise ServerUnavailableError("malformed batch response: header line and frame sizes disagree")
    out, offset = [], 0
    for entry, size in zip(entries, sizes, strict=True):
        server_s = (float(entry[3]) + float(entry[4])) / 1e3
        out.append((tuple(entry[0]), Fetched(rest[offset:offset + size], str(entry[1]), server_s)))
        offset += size
    return out


def _record(line: bytes, url: str) -> tuple[tuple[int, ...], str, int, float]:
    """A streamed batch's record line: (index, tier, frame size, server ms)."""
    try:
        entry = json.loads(line)
        return tuple(int(i) for i in entry[0]), str(entry[1]), int(entry[2]), float(entry[3]) + float(entry[4])
    except (ValueError, KeyError, TypeError, IndexError):
        raise ServerUnavailableError(f"malformed streamed batch from {url}: {line[:80]!r}") from None


class HttpTransport(Transport):
    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None
        self.link_bps: float | None = None  # measured on block answers, told to the server with each request

    def _measured(self, nbytes: int, elapsed: float, server_s: float) -> None:
        """An answer of ``nbytes`` took ``elapsed`` s, ``server_s`` of them on the server: the rest is
        the link's (a slight underestimate of its throughput: it includes a round trip)."""
        network_s = elapsed - server_s
        if nbytes >= LINK_SAMPLE_BYTES and network_s > 0:
            rate = nbytes / network_s
            self.link_bps = rate if self.link_bps is None else self.link_bps + LINK_WEIGHT * (rate - self.link_bps)

    def _block_headers(self, session: str | None, position: Sequence[BlockIndex] | None,
                       moves: bool) -> dict[str, str]:
        headers = view_headers(session, position)
        if not moves:
            headers[MOVES_HEADER] = "no"
        if self.link_bps is not None:
            headers[LINK_HEADER] = f"{self.link_bps:.0f}"
        return headers

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=config.get_seconds("http.timeout"), sock_connect=10),
                connector=aiohttp.TCPConnector(limit=64)
            )
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
    ) -> tuple[bytes, Any]:
        url = f"{self.base_url}{path}"

        async def attempt() -> tuple[bytes, Any]:
            async with self._opened(method, url, params=params, json=json_body, headers=headers) as response:
                return await response.read(), response.headers

        return await _retried(attempt)

    @contextlib.asynccontextmanager
    async def _opened(self, method: str, url: str, headers: dict[str, str] | None = None,
                      **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        """One try's answer, error statuses raised; while it is read too, failures worth another try
        raise ``_Transient``."""
        session = await self._get_session()
        try:
            async with session.request(method, url, headers={**self._headers, **(headers or {})},
                                       **kwargs) as response:
                if response.status >= 400:
                    self._raise_for(url, response.status, await response.read())
                yield response
        except asyncio.TimeoutError as exc:  # the whole request ran out of time: not worth repeating
            raise ServerUnavailableError(f"tierscope server at {url} did not answer in time") from exc
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:  # refused, reset, cut short:
            # the server may be back soon
            error = ServerUnavailableError(f"cannot reach tierscope server at {url}: {exc or type(exc).__name__}")
            error.__cause__ = exc
            raise _Transient(error) from None

    def _raise(self, url: str, status: int, body: bytes) -> None:
        try:
            payload = json.loads(body)
            message, kind = payload["error"], payload.get("type", "")
        except (ValueError, KeyError, TypeError):
            message, kind = body[:200].decode("utf-8", "replace"), ""
        if kind in _ERRORS and (status < 500 or kind == StoreError.__name__):  # a storage failure is 500
            raise _ERRORS[kind](message)
        if status == 401:
            raise AuthenticationError(f"tierscope server at {url} refused the request (HTTP 401): "
                                         f"{message}; pass token= or set TIERSCOPE_TOKEN")
        raise ServerUnavailableError(f"tierscope server at {url} answered HTTP {status}: {message}")

    def _get_json(self, path: str) -> Any:
        body, _ = _sync.sync(self._request("GET", path))
        return json.loads(body)

    def info(self, dataset: str) -> DatasetInfo:
        return DatasetInfo.from_json(self._get_json(f"/datasets/{dataset}"))

    def fetch(
        self,
        dataset: str,
        variable: str,
        index: BlockIndex,
        tol: float,
        purpose: str = "user",
        session: str | None = None,
        position: Sequence[BlockIndex] | None = None,
        *,
        moves: bool = True,
    ) -> Fetched:
        path = f"/datasets/{dataset}/blocks/{variable}/{_block_path(index)}"
        params = {"tol": repr(float(tol)), "purpose": purpose}
        t0 = time.perf_counter()
        body, headers = _sync.sync(self._request("GET", path, params,
                                                 self._block_headers(session, position, moves)))
        elapsed = time.perf_counter() - t0
        try:
            server_ms = float(headers["X-Tierscope-Read-Ms"]) + float(headers["X-Tierscope-Encode-Ms"])
            tier = headers["X-Tierscope-Tier"]
        except (KeyError, ValueError):
            raise ServerUnavailableError(
                f"{self.base_url} answered block {tuple(index)} without valid X-Tierscope-* headers"
            ) from None
        self._measured(len(body), elapsed, server_ms / 1e3)
        return Fetched(body, tier, server_ms / 1e3)

    def fetch_many(
        self,
        dataset: str,
        variable: str,
        indices: Sequence[BlockIndex],
        tol: float,
        purpose: str = "user",
        session: str | None = None,
        position: Sequence[BlockIndex] | None = None,
        codec: str | None = None,
        *,
        moves: bool = True,
    ) -> list[Fetched]:
        """Many blocks in one ``POST /datasets/{name}/batch`` round trip per 256 blocks."""
        frames: list[Fetched] = []
        indices = [[int(i) for i in index] for index in indices]
        for start in range(0, len(indices), MAX_BATCH):
            request = {"variable": variable, "tol": float(tol), "purpose": purpose,
                       "blocks": indices[start:start + MAX_BATCH]}
            if codec is not None:
                request["codec"] = codec
            t0 = time.perf_counter()
            body, _ = _sync.sync(self._request("POST", f"/datasets/{dataset}/batch",
                                               headers=self._block_headers(session, position, moves),
                                               json_body=request))
            blocks = [block for _, block in split_batch(body)]
            self._measured(len(body), time.perf_counter() - t0, max(b.server_s for b in blocks))
            frames.extend(blocks)
        return frames

    def fetch_each(
        self,
        dataset: str,
        variable: str,
        indices: Sequence[BlockIndex],
        tol: float,
        purpose: str = "user",
        session: str | None = None,
        position: Sequence[BlockIndex] | None = None,
        *,
        moves: bool = True,
    ) -> Iterator[tuple[BlockIndex, Fetched]]:
        """Streamed batches (``"stream": true``, docs/protocol.md): each block as the server has it ready,
        so the caller decodes one while the next is still being read, encoded or sent."""
        indices = [[int(i) for i in index] for index in indices]
        for start in range(0, len(indices), MAX_BATCH):
            request = {"variable": variable, "tol": float(tol), "purpose": purpose, "stream": True,
                       "blocks": indices[start:start + MAX_BATCH]}
            arrived: queue.SimpleQueue = queue.SimpleQueue()
            done = asyncio.run_coroutine_threadsafe(
                self._stream(f"/datasets/{dataset}/batch", self._block_headers(session, position, moves),
                             request, arrived), _sync.loop())
            try:
                for _ in range(len(request["blocks"])):
                    item = arrived.get()
                    if item is None:  # the stream ended early: its error is the future's
                        break
                    yield item
                done.result()
            finally:
                done.cancel()  # a caller that stopped early: stop reading

    async def _stream(self, path: str, headers: dict[str, str], body: Any, arrived: queue.SimpleQueue) -> None:
        """Read a streamed batch, putting each (index, block) on ``arrived``; None when it ends. Retried
        like any request while nothing has arrived; a failure after that is the caller's."""
        url, given = f"{self.base_url}{path}", 0

        async def attempt() -> None:
            nonlocal given
            t0, nbytes, server_s = time.perf_counter(), 0, 0.0
            try:
                async with self._opened("POST", url, json=body, headers=headers) as response:
                    while line := await response.content.readline():
                        index, tier, size, server_ms = _record(line, url)
                        block = Fetched(await response.content.readexactly(size), tier, server_ms / 1e3)
                        nbytes, server_s = nbytes + size, max(server_s, block.server_s)
                        arrived.put((index, block))
                        given += 1
            except _Transient as transient:
                if given:  # blocks were handed on already: another try would hand them on again
                    raise transient.error from transient.error.__cause__
                raise
            self._measured(nbytes, time.perf_counter() - t0, server_s)

        try:
            await _retried(attempt)
        finally:
            arrived.put(None)

    def _raise_for(self, url: str, status: int, body: bytes) -> None:
        """An error answer: ``_Transient`` for a status worth another try, else the error itself."""
        if status in _RETRY_STATUS:
            try:
                self._raise(url, status, body)
            except Exception as exc:
                raise _Transient(exc) from None
        self._raise(url, status, body)

    def server_stats(self) -> dict[str, object]:
        return self._get_json("/stats")

    def codec(self) -> str:
        return str(self._get_json("/config")["codec"])

    def close(self) -> None:
        if self._session is not None and not self._session.closed:
            _sync.sync(self._session.close(), timeout=10)
