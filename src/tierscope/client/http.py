"""The HTTP transport: one keep-alive aiohttp session per process, shared by all threads."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tierscope import _sync
from tierscope.client.source import Transport
from tierscope.errors import (
    BlockIndexError,
    DatasetNotFoundError,
    ServerUnavailableError,
    StoreError,
    VariableNotFoundError,
)
from tierscope.grid import BlockIndex
from tierscope.metadata import DatasetInfo

__all__ = ["HttpTransport"]

# Errors the server reports by class name, re-raised here as the same class with the same message.
_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (DatasetNotFoundError, VariableNotFoundError, BlockIndexError, StoreError, ValueError)
}
_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=10)


class HttpTransport(Transport):
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=_TIMEOUT, connector=aiohttp.TCPConnector(limit=64)
            )
        return self._session

    async def _request(
        self, method: str, path: str, params: dict[str, str] | None = None
    ) -> tuple[bytes, Any]:
        url = f"{self.base_url}{path}"
        session = await self._get_session()
        try:
            async with session.request(method, url, params=params) as response:
                body = await response.read()
                if response.status >= 400:
                    self._raise(url, response.status, body)
                return body, response.headers
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ServerUnavailableError(
                f"cannot reach tierscope server at {url}: {exc or type(exc).__name__}"
            ) from exc

    def _raise(self, url: str, status: int, body: bytes) -> None:
        try:
            payload = json.loads(body)
            message, kind = payload["error"], payload.get("type", "")
        except (ValueError, KeyError, TypeError):
            message, kind = body[:200].decode("utf-8", "replace"), ""
        if status < 500 and kind in _ERRORS:
            raise _ERRORS[kind](message)
        raise ServerUnavailableError(f"tierscope server at {url} answered HTTP {status}: {message}")

    def _get_json(self, path: str) -> Any:
        body, _ = _sync.sync(self._request("GET", path))
        return json.loads(body)

    def info(self, dataset: str) -> DatasetInfo:
        return DatasetInfo.from_json(self._get_json(f"/datasets/{dataset}"))

    def fetch(
        self, dataset: str, variable: str, index: BlockIndex, tol: float, purpose: str = "user"
    ) -> bytes:
        path = f"/datasets/{dataset}/blocks/{variable}/{'.'.join(map(str, index))}"
        body, _ = _sync.sync(self._request("GET", path, {"tol": repr(float(tol)), "purpose": purpose}))
        return body

    def server_stats(self) -> dict[str, object]:
        return self._get_json("/stats")

    def close(self) -> None:
        if self._session is not None and not self._session.closed:
            _sync.sync(self._session.close(), timeout=10)
