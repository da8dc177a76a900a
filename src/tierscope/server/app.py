"""The block server's HTTP face (aiohttp, HTTP/1.1 keep-alive). See docs/protocol.md.

Routes:
  GET  /datasets, GET /datasets/{name}             served datasets, one dataset's description
  GET  /datasets/{name}/blocks/{var}/{i.j.k...}    one frame (?tol=&codec=&purpose=user|prefetch)
  POST /datasets/{name}/batch                      many frames of one variable in one response
  GET  /stats, POST /stats/reset, GET /metrics     counters (JSON), reset, Prometheus text
  GET  /config, PUT /config                        tier sizes, policy, prefetch; re-init
Errors are JSON ``{"error": message, "type": ErrorClass}`` with a 4xx status for bad input, so the client
can re-raise the same error class with the same message.
"""

from __future__ import annotations

import abc
import asyncio
import gc
import hmac
import json
import logging
import math
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Self

from aiohttp import web

from tierscope.errors import (
    BlockIndexError,
    DatasetNotFoundError,
    StoreError,
    TierscopeError,
    VariableNotFoundError,
)
from tierscope.server.limits import ByteBudget, ServerBusyError, stream, stream_each
from tierscope.protocol import LINK_HEADER, MAX_INDEX_LEN, MOVES_HEADER, POSITION_HEADER, parse_block_index
from tierscope.server.service import GIL_SWITCH_S, BlockResult, BlockService
from tierscope.server.zarr_http import add_zarr_routes

__all__ = ["AppThread", "BATCH_CONTENT_TYPE", "ServerThread", "create_app", "freeze_heap", "new_event_loop",
           "run_server"]

logger = logging.getLogger(__name__)

SERVICE = web.AppKey("service", BlockService)
TOKEN = web.AppKey("token", str)
REGISTRY = web.AppKey("registry", object)
BUDGET = web.AppKey("budget", ByteBudget)
MAX_BODY = 64 << 10  # batch and config bodies are small JSON documents
SHUTDOWN_TIMEOUT = 10.0
BATCH_CONTENT_TYPE = "application/x-tierscope-batch"
STREAM_CONTENT_TYPE = "application/x-tierscope-stream"
_STATUS = {
    DatasetNotFoundError: 404,
    VariableNotFoundError: 404,
    BlockIndexError: 404,
    StoreError: 500,
    ServerBusyError: 503,
}
_BLOCK_QUERY = ("tol", "codec", "purpose")
_BATCH_FIELDS = ("variable", "tol", "codec", "purpose", "blocks", "stream")
_CONFIG_FIELDS = ("l3", "l4", "policy", "prefetch", "drop_page_cache")

routes = web.RouteTableDef()


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "type": kind}, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler):  # noqa: ANN001, ANN201 - aiohttp signature
    """Turn every failure into a JSON error; nothing escapes to crash the connection."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason if exc.text is None else exc.text, type(exc).__name__)
    except TierscopeError as exc:
        status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 400)
        return _error(status, str(exc), type(exc).__name__)
    except ValueError as exc:
        return _error(400, str(exc), "ValueError")
    except Exception as exc:  # a bug: keep serving, say so
        logger.exception("unexpected error serving %s", request.path)
        return _error(500, f"internal error: {exc}", type(exc).__name__)


@web.middleware
async def auth_middleware(request: web.Request, handler):  # noqa: ANN001, ANN201 - aiohttp signature
    """With a token set, every route needs ``Authorization: Bearer <token>`` (constant-time compare)."""
    token = request.app.get(TOKEN)
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        expected = token.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), expected
        ):
            return _error(401, "missing or invalid bearer token (send Authorization: Bearer <token>)",
                          "AuthenticationError", headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


def _link(request: web.Request) -> float | None:
    """The client's measured link throughput (``X-Tierscope-Link``, bytes/s), if it sent one."""
    raw = request.headers.get(LINK_HEADER)
    if raw is None:
        return None
    try:
        return float(raw[:32])
    except ValueError:
        raise ValueError(f"{LINK_HEADER} must be a number of bytes per second, got {raw[:40]!r}") from None


def _moves(request: web.Request) -> bool:
    """Whether the request moves its session's position (``X-Tierscope-Moves``: ``yes``, the default, or
    ``no``)."""
    raw = request.headers.get(MOVES_HEADER, "yes")
    if raw not in ("yes", "no"):
        raise ValueError(f"{MOVES_HEADER} must be yes or no, got {raw[:40]!r}")
    return raw == "yes"


def _session(request: web.Request) -> str | None:
    return request.headers.get("X-Tierscope-Session")


def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each known and given once."""
    query = request.query
    for key in query:
        if key not in allowed:
            raise ValueError(f"unknown query parameter {key[:40]!r} (allowed: {', '.join(allowed)})")
        if len(query.getall(key)) > 1:
            raise ValueError(f"query parameter {key!r} given more than once")
    return dict(query)


def _tol(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValueError(f"tol must be a number, got {raw!r}")
    try:
        return float(raw)
    except (ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise ValueError(f"tol must be a finite number, got {str(raw)[:40]!r}") from None


def _result_headers(result: BlockResult) -> dict[str, str]:
    return {
        "X-Tierscope-Tier": result.tier,
        "X-Tierscope-Read-Ms": f"{result.read_s * 1e3:.3f}",
        "X-Tierscope-Encode-Ms": f"{result.encode_s * 1e3:.3f}",
    }


async def _json_body(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    body = await request.read()  # bounded by client_max_size: 413 beyond it
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurd nesting
        raise ValueError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ValueError("request body must be a JSON object")
    unknown = sorted(set(payload) - set(allowed))
    if unknown:
        names = ", ".join(map(repr, unknown))[:200]
        raise ValueError(f"unknown field(s) {names} (allowed: {', '.join(allowed)})")
    return payload


def _optional_str(payload: dict[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}"[:200])
    return value


@routes.get("/datasets")
async def list_datasets(request: web.Request) -> web.Response:
    return web.json_response({"datasets": request.app[SERVICE].datasets()})


@routes.get("/datasets/{name}")
async def dataset_info(request: web.Request) -> web.Response:
    info = request.app[SERVICE].info(request.match_info["name"])
    return web.json_response(info.to_json())


def _block_nbytes(service: BlockService, dataset: str, variable: str) -> int:
    """A raw block's size: what one frame is charged against the response budget (0 for a request the
    service will refuse anyway)."""
    try:
        var = service.info(dataset).variable(variable)
    except (DatasetNotFoundError, VariableNotFoundError):
        return 0
    return math.prod(var.block) * var.dtype.itemsize


def _charged(result: BlockResult) -> tuple[bytes, int]:
    """A frame and what it costs the response budget: nothing when L3 holds it anyway."""
    return result.frame, 0 if result.shared else len(result.frame)


@routes.get("/datasets/{name}/blocks/{var}/{index}")
async def block(request: web.Request) -> web.StreamResponse:
    query = _query(request, _BLOCK_QUERY)
    service, name, var = request.app[SERVICE], request.match_info["name"], request.match_info["var"]
    async with request.app[BUDGET].hold(_block_nbytes(service, name, var)) as charge:
        result = await service.block(
            name,
            var,
            parse_block_index(request.match_info["index"]),
            tol=_tol(query.get("tol", "0")),
            codec_name=query.get("codec"),
            purpose=query.get("purpose", "user"),
            session=_session(request),
            position=request.headers.get(POSITION_HEADER),
            link_bps=_link(request),
            moves=_moves(request),
        )
        return await stream(request, [_charged(result)], charge, "application/octet-stream",
                            _result_headers(result))


@routes.post("/datasets/{name}/batch")
async def batch(request: web.Request) -> web.StreamResponse:
    """Body: one JSON header line ``{"blocks": [[index, tier, nbytes, read_ms, encode_ms], ...]}``, then
    the frames back to back in that order. With ``"stream": true``: each block as soon as it is ready, as
    its own ``[index, tier, nbytes, read_ms, encode_ms]`` line followed by its frame."""
    _query(request, ())
    payload = await _json_body(request, _BATCH_FIELDS)
    variable = _optional_str(payload, "variable")
    if variable is None:
        raise ValueError("variable is required: the name of the variable whose blocks are wanted")
    blocks = payload.get("blocks")
    if not isinstance(blocks, list) or not all(
        isinstance(b, list) and 0 < len(b) <= MAX_INDEX_LEN
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in b)
        for b in blocks
    ):
        raise ValueError("blocks must be a list of block indices, each a list of non-negative integers")
    streamed = payload.get("stream", False)
    if not isinstance(streamed, bool):
        raise ValueError(f"stream must be true or false, got {streamed!r}"[:200])
    service, name = request.app[SERVICE], request.match_info["name"]
    block_nbytes = _block_nbytes(service, name, variable)
    args = (name, variable, [tuple(b) for b in blocks])
    kwargs = {"tol": _tol(payload.get("tol", 0)), "codec_name": _optional_str(payload, "codec"),
              "purpose": _optional_str(payload, "purpose") or "user", "session": _session(request),
              "position": request.headers.get(POSITION_HEADER), "link_bps": _link(request),
              "moves": _moves(request)}
    async with request.app[BUDGET].hold(len(blocks) * block_nbytes) as charge:
        if streamed:
            results = await service.batch_stream(*args, **kwargs)
            return await stream_each(request, _records(blocks, results, charge.nbytes, block_nbytes),
                                     charge, STREAM_CONTENT_TYPE)
        results = await service.batch(*args, **kwargs)
        header = {"blocks": [
            [list(index), r.tier, len(r.frame), round(r.read_s * 1e3, 3), round(r.encode_s * 1e3, 3)]
            for index, r in zip(blocks, results, strict=True)
        ]}
        head = json.dumps(header, separators=(",", ":")).encode() + b"\n"
        return await stream(request, [(head, 0), *map(_charged, results)], charge, BATCH_CONTENT_TYPE)


async def _records(blocks: list[list[int]], results: AsyncIterator[tuple[int, BlockResult]], charged: int,
                   block_nbytes: int) -> AsyncIterator[tuple[bytes, int]]:
    """A streamed batch's chunks: per block, its line and its frame; the charge left after each."""
    async for place, r in results:
        line = json.dumps([blocks[place], r.tier, len(r.frame), round(r.read_s * 1e3, 3),
                           round(r.encode_s * 1e3, 3)], separators=(",", ":")).encode() + b"\n"
        charged = max(0, charged - block_nbytes)
        yield line + r.frame, charged


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    await request.app[SERVICE].settled()  # the plans of the requests answered before count
    return web.json_response(request.app[SERVICE].stats())


@routes.post("/stats/reset")
async def reset_stats(request: web.Request) -> web.Response:
    await request.app[SERVICE].settled()
    request.app[SERVICE].reset_stats()
    return web.json_response({"status": "ok"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    from tierscope.server.metrics import CONTENT_TYPE, render

    await request.app[SERVICE].settled()
    return web.Response(body=render(request.app[REGISTRY]), headers={"Content-Type": CONTENT_TYPE})


@routes.get("/config")
async def get_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].config())


@routes.put("/config")
async def put_config(request: web.Request) -> web.Response:
    payload = await _json_body(request, _CONFIG_FIELDS)
    return web.json_response(await request.app[SERVICE].configure(**payload))


def _check_token(token: str | None) -> str | None:
    if token is not None and (not token or not token.isascii() or not token.isprintable() or " " in token):
        raise ValueError("the server token must be non-empty printable ASCII without spaces")
    return token


def create_app(service: BlockService, *, token: str | None = None) -> web.Application:
    """The block server app; the service starts (pools, prefetch workers) on the app's loop."""
    from tierscope.server.metrics import metrics_registry  # prometheus_client: only servers need it

    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=MAX_BODY)
    app[SERVICE] = service
    app[REGISTRY] = metrics_registry(service)
    app[BUDGET] = ByteBudget()
    if _check_token(token):
        app[TOKEN] = token

    async def service_ctx(app: web.Application):  # noqa: ANN202 - aiohttp cleanup context
        await service.start()
        yield
        await service.aclose()  # after in-flight responses finished (aiohttp's graceful shutdown)

    app.cleanup_ctx.append(service_ctx)
    app.add_routes(routes)
    add_zarr_routes(app, service, app[BUDGET])  # /zarr/{name}/...: plain zarr v3 readers
    return app


def run_server(
    service: BlockService, host: str, port: int, token: str | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; in-flight responses get up to ``SHUTDOWN_TIMEOUT`` s to finish.

    The process is the server's: its GIL switch interval is lowered to ``GIL_SWITCH_S`` (never raised),
    and what it holds once the app is made (modules, the service) is frozen out of the garbage collector
    (``freeze_heap``). Every address of ``host`` is bound first, so a taken port is a one-line
    ``ValueError`` before anything starts, and ``ready(base_url)`` (e.g. printing "serving ...") runs only
    once it is true.
    """
    sockets = _listen(host, port)
    sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_S))  # this process serves: the loop first
    app = create_app(service, token=token)
    freeze_heap()
    if ready is not None:
        ready(f"http://{host}:{sockets[0].getsockname()[1]}")
    web.run_app(app, sock=sockets, print=None, shutdown_timeout=SHUTDOWN_TIMEOUT, loop=new_event_loop())


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop a block server runs on: uvloop's where it is installed (a dependency on Linux and macOS),
    else asyncio's. uvloop's transports are C (libuv): the loop spends ~25% less CPU per block request,
    and every other request waits on that (docs/server.md, "Concurrency")."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def freeze_heap() -> None:
    """Collect, then move every object left to the collector's permanent generation: a server process's
    full collections then traverse what serving made, not the ~10^5 objects of its modules, which took the
    GIL from the loop for ~60 ms each (docs/server.md). For a process that serves, like the switch interval."""
    gc.collect()
    gc.freeze()


def _listen(host: str, port: int) -> list[socket.socket]:
    """Bind every address of ``host``; a failure closes what was bound and names host, port and reason."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, _, _, _, address in addresses:
            sockets.append(socket.create_server(address, family=family))
    except OSError as exc:  # its strerror repeats the address: keep the plain reason
        for sock in sockets:
            sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {os.strerror(exc.errno)}") from None
    return sockets


class AppThread(abc.ABC):
    """Run an aiohttp app on loopback in a background thread with its own event loop (``new_event_loop``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, name: str = "tierscope-app") -> None:
        self.host, self.port = host, port
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=name)
        self._runner: web.AppRunner | None = None

    @abc.abstractmethod
    def make_app(self) -> web.Application:
        """The app to serve (made on the thread's loop)."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        # Bind first: a taken port fails here, before the app (and any service behind it) starts.
        try:
            sock = socket.create_server((self.host, self.port))
        except OSError:
            self._loop.close()
            raise
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(sock), self._loop).result(timeout=30)
        except BaseException:
            sock.close()
            self.stop()
            raise
        return self

    async def _start(self, sock: socket.socket) -> None:
        self._runner = web.AppRunner(self.make_app(), handle_signals=False,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self.port = sock.getsockname()[1]

    def stop(self) -> None:
        """Stop accepting, let in-flight responses finish, then stop the app and the loop."""
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(
                timeout=SHUTDOWN_TIMEOUT + 30
            )
            self._runner = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerThread(AppThread):
    """Run a block server on loopback in a background thread (tests, the demo, notebooks).

    >>> with ServerThread(service) as server:   # doctest: +SKIP
    ...     xr.open_dataset(f"{server.url}/datasets/turb", engine="tierscope")
    """

    def __init__(self, service: BlockService, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None) -> None:
        super().__init__(host, port, name="tierscope-server")
        self.service, self.token = service, _check_token(token)

    def make_app(self) -> web.Application:
        return create_app(self.service, token=self.token)
