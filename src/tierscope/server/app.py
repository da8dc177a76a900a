"""The block server's HTTP face (aiohttp, HTTP/1.1 keep-alive).

Routes (see docs/protocol.md):
  GET  /datasets                                   names of the served datasets
  GET  /datasets/{name}                            DatasetInfo as JSON
  GET  /datasets/{name}/blocks/{var}/{i.j.k...}    one frame (?tol=&codec=&purpose=user|prefetch)
  GET  /stats, POST /stats/reset                   server counters
Errors are JSON ``{"error": message, "type": ErrorClass}`` with a 4xx status for bad input, so the client
can re-raise the same error class with the same message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from tierscope.errors import (
    BlockIndexError,
    DatasetNotFoundError,
    StoreError,
    TierscopeError,
    VariableNotFoundError,
)
from tierscope.server.service import BlockService

__all__ = ["ServerThread", "create_app", "parse_block_index"]

logger = logging.getLogger(__name__)

SERVICE = web.AppKey("service", BlockService)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
MAX_INDEX_LEN = 32
_STATUS = {
    DatasetNotFoundError: 404,
    VariableNotFoundError: 404,
    BlockIndexError: 404,
    StoreError: 500,
}

routes = web.RouteTableDef()


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": message, "type": kind}, status=status)


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


def parse_block_index(text: str) -> tuple[int, ...]:
    """Parse ``"3.0.1.2"`` into a block index (non-negative ints, bounded length)."""
    parts = text.split(".")
    if not text or len(parts) > MAX_INDEX_LEN or not all(p.isdigit() and len(p) < 10 for p in parts):
        raise ValueError(f"malformed block index {text!r}: expected dot-separated integers like 0.3.1.2")
    return tuple(int(p) for p in parts)


def _query_tol(request: web.Request) -> float:
    raw = request.query.get("tol", "0")
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"tol must be a number, got {raw!r}") from None


@routes.get("/datasets")
async def list_datasets(request: web.Request) -> web.Response:
    return web.json_response({"datasets": request.app[SERVICE].datasets()})


@routes.get("/datasets/{name}")
async def dataset_info(request: web.Request) -> web.Response:
    info = request.app[SERVICE].info(request.match_info["name"])
    return web.json_response(info.to_json())


@routes.get("/datasets/{name}/blocks/{var}/{index}")
async def block(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    index = parse_block_index(request.match_info["index"])
    tol = _query_tol(request)
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(
        request.app[EXECUTOR],
        lambda: service.block(
            request.match_info["name"],
            request.match_info["var"],
            index,
            tol=tol,
            codec_name=request.query.get("codec"),
            purpose=request.query.get("purpose", "user"),
        ),
    )
    return web.Response(
        body=result.frame,
        content_type="application/octet-stream",
        headers={
            "X-Tierscope-Tier": result.tier,
            "X-Tierscope-Read-Ms": f"{result.read_s * 1e3:.3f}",
            "X-Tierscope-Encode-Ms": f"{result.encode_s * 1e3:.3f}",
        },
    )


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].stats())


@routes.post("/stats/reset")
async def reset_stats(request: web.Request) -> web.Response:
    request.app[SERVICE].reset_stats()
    return web.json_response({"status": "ok"})


def create_app(service: BlockService, *, workers: int = 4) -> web.Application:
    """The block server app; storage reads and encodes run in a bounded thread pool."""
    app = web.Application(middlewares=[error_middleware], client_max_size=1 << 20)
    app[SERVICE] = service

    async def executor_ctx(app: web.Application):  # noqa: ANN202 - aiohttp cleanup context
        app[EXECUTOR] = ThreadPoolExecutor(workers, thread_name_prefix="tierscope-block")
        yield
        app[EXECUTOR].shutdown(wait=True)

    app.cleanup_ctx.append(executor_ctx)
    app.add_routes(routes)
    return app


class ServerThread:
    """Run a block server on loopback in a background thread (tests, the demo, notebooks).

    >>> with ServerThread(service) as server:   # doctest: +SKIP
    ...     xr.open_dataset(f"{server.url}/datasets/turb", engine="tierscope")
    """

    def __init__(self, service: BlockService, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service, self.host, self.port = service, host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="tierscope-server")
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(create_app(self.service), handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
