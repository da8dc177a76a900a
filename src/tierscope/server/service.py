"""The block service: L3 (encoded frames) and L4 (raw blocks) over origins, with server-side prefetch.

One asyncio loop owns every piece of mutable state but the positions (tiers' bookkeeping, the prefetch
queue, counters), and does bounded work per request; one planning thread owns the positions and makes
the prefetch plans (``planner.py``); origin reads and encodes run in two bounded thread pools:

- user work (``purpose=user`` requests) has its own pool of ``workers`` threads;
- prefetch work (server plans and ``purpose=prefetch`` requests) holds one of ``prefetch_workers`` slots
  before it starts a load, and its pool has exactly that many threads, so prefetch never queues inside an
  executor. A user request therefore never waits behind prefetch work: it either runs in its own pool, or
  joins a prefetch load that is already running (single flight), and queued plans are dropped as soon as
  the position moves on.

Path of one block: L3 hit -> frame; L4 hit -> encode -> L3; miss -> origin read -> L4 -> encode -> L3.
Every tier lookup is single flight, so one key is never read from its origin twice at the same time.
The HTTP app awaits the service on its own loop; the embedded transport runs it on the process's I/O loop
(``tierscope._sync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from tierscope import codec
from tierscope.cache import TierCache, Views, check_policy
from tierscope.codec.device import resolve_device
from tierscope.errors import BlockIndexError, DatasetNotFoundError
from tierscope.grid import BlockGrid, BlockIndex
from tierscope.levels import split_level
from tierscope.metadata import DatasetInfo, VariableInfo, check_tol
from tierscope.prefetch import MODES, Box
from tierscope.protocol import MAX_BATCH, MAX_POSITION_BLOCKS, parse_block_index
from tierscope.server.choice import Costs
from tierscope.server.loads_process import Loaded, OriginSpec, ProcessLoads, origin_spec
from tierscope.server.planner import Delivery, Planner, TierRoom, View
from tierscope.server.planner_process import ProcessPlanner
from tierscope.server.sessions import PLAN_TTL_S, PositionKey, PrefetchItem, PrefetchQueue, check_session
from tierscope.server.stats import ServerStats
from tierscope.store.origin import Origin

__all__ = ["PURPOSES", "BlockResult", "BlockService",
           "check_prefetch", "parse_size"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

PURPOSES = ("user", "prefetch")
ANONYMOUS = "-"
STORED = "stored"  # the codec part of an L3 key for a pre-encoded store's frames: one entry answers every tol
MAX_TOLS = 8  # tols per variable whose L3 frames a looser request looks through
# A thread that wants the GIL gets it within this long of asking (CPython's default is 5 ms). The loop asks
# after every socket call and wakeup; with the planner or a pool thread busy in Python, the default alone
# would cost the loop 5 ms at each, its whole lag budget. Set by ``app.run_server`` (a process that is a
# block server), not by a service embedded in someone else's process.
GIL_SWITCH_S = 0.0005
# Prefetch threads run this much nicer than the process (Linux: a thread's own nice value): on a busy
# machine a free CPU goes to the loop and the user pool first. Their encodes and reads release the GIL.
PREFETCH_NICE = 10
# Where prefetch planning runs: a thread of the server's process, or a child process of its own
# (``planner_process.py``: it shares no GIL with the loop; ``tierscope serve``'s default).
PLANNERS = ("thread", "process")
# Where prefetch reads and encodes of blocks L4 lacks run: the prefetch threads, or child processes
# (``loads_process.py``: no GIL shared with the loop; ``tierscope serve``'s default).
PREFETCH_LOADS = ("thread", "process")
# A frame at a tol within [tol * CLOSE, tol] answers a request at tol whatever the link: it is at most
# about one bit per value finer (nearly the same size), and sharing it spares an encode and an L3 entry.
CLOSE = 0.5


def parse_size(value: int | str, name: str) -> int:
    """A tier capacity: bytes as an int or a string like ``"4GiB"`` (dask.utils.parse_bytes); 0 = off.

    At most this machine's physical memory: a tier is held in RAM, and a larger one is a typo.
    """
    from dask.utils import format_bytes, parse_bytes

    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{name} must be a size like '1GiB' or a number of bytes, got {value!r}")
    try:
        size = parse_bytes(value) if isinstance(value, str) else value
    except (ValueError, TypeError):
        raise ValueError(f"{name} must be a size like '1GiB' or a number of bytes, got {value!r}") from None
    if size < 0:
        raise ValueError(f"{name} must be >= 0 bytes, got {value!r}")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if size > memory:
        raise ValueError(f"{name} of {value!r} exceeds this machine's memory ({format_bytes(memory)})")
    return int(size)


def check_prefetch(mode: str) -> str:
    """A prefetch setting: ``on`` (= ``auto``), ``off``, or a mode of ``tierscope.prefetch``."""
    if mode == "on":
        return "auto"
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"prefetch must be on, {', '.join(MODES)}; got {mode!r}")
    return mode


def _view_box(grid: BlockGrid, blocks: Sequence[Sequence[int]] | np.ndarray) -> Box:
    """The box of a view's blocks, checked in one NumPy pass; block by block only to name a bad one."""
    indices = np.asarray(blocks, dtype=np.int64) if len({len(b) for b in blocks}) == 1 else None
    if (indices is None or indices.shape[1] != grid.ndim or (indices < 0).any()
            or (indices >= np.asarray(grid.nblocks)).any()):
        for index in blocks:
            grid.check(index)  # raises, naming the block and the axis
    return Box(tuple(indices.min(axis=0).tolist()), tuple(indices.max(axis=0).tolist()))


def _nicer(by: int) -> None:
    """Lower the calling thread's OS priority (where threads have their own: Linux); else leave it."""
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + by)


@functools.cache
def _header_pattern(ndim: int) -> re.Pattern[str]:
    """A well-formed position header of blocks with ``ndim`` axes."""
    block = r"\d{1,9}" + r"\.\d{1,9}" * (ndim - 1)
    return re.compile(rf"{block}(?:;{block})*")


def _header_box(grid: BlockGrid, header: str) -> Box:
    """The box of a position header's blocks. A well-formed header is read in a few C-level passes (a
    regular expression, NumPy's text parser, a min and a max: tens of microseconds of the loop for 64
    blocks); block by block only to name what is wrong with a bad one."""
    if _header_pattern(grid.ndim).fullmatch(header):
        indices = np.fromstring(header.replace(";", "."), dtype=np.int64, sep=".").reshape(-1, grid.ndim)
        lo, hi = indices.min(axis=0), indices.max(axis=0)  # >= 0: digits only
        if (hi < np.asarray(grid.nblocks)).all():
            return Box(tuple(lo.tolist()), tuple(hi.tolist()))
    return _view_box(grid, [parse_block_index(p.strip(), "X-Tierscope-Position block")
                            for p in header.split(";")])


@dataclass(frozen=True)
class BlockResult:
    """One encoded block, which tier answered it, and where its time went on the server.

    A request that joined a load already in flight reports that load's tier and stage times.
    """

    frame: bytes
    tier: str  # "l3", "l4" or "origin"
    read_s: float
    encode_s: float
    shared: bool = False  # L3 held this frame when it was answered: the answer costs no memory of its own


@dataclass(frozen=True, slots=True)
class _Raw:
    """An L4 value: a raw block (read-only) and how long its origin read took."""

    array: np.ndarray
    read_s: float

    @property
    def nbytes(self) -> int:
        return self.array.nbytes


@dataclass(frozen=True, slots=True)
class _Encoded:
    """An L3 value: charged at its encoded size."""

    frame: bytes
    tier: str
    read_s: float
    encode_s: float

    @property
    def nbytes(self) -> int:
        return len(self.frame)


@dataclass(frozen=True, slots=True)
class _Request:
    """A validated (dataset, variable, tol, codec); ``close``: tighter tols whose frames answer it too."""

    origin: Origin
    variable: VariableInfo
    tol: float
    codec: str
    link_bps: float | None = None  # the client's link throughput, when it said (and the service adapts)
    close: tuple[float, ...] = ()

    @property
    def dataset(self) -> str:
        return self.origin.name

    def l3_keys(self, index: BlockIndex, tols: Sequence[float] | None = None) -> list[tuple]:
        """The L3 keys of frames that answer this request, its own first: a pre-encoded store's one frame,
        else the frames at this tol and at ``tols`` (default: the ``close`` ones); within a tighter bound
        is within this one."""
        dataset, variable = self.dataset, self.variable.name
        if self.variable.stored_tol:
            return [(dataset, variable, self.variable.stored_tol, STORED, index)]
        tols = (self.tol, *(self.close if tols is None else tols))
        return [(dataset, variable, tol, self.codec, index) for tol in tols]


class BlockService:
    """Serves encoded blocks of a set of origins, keyed by dataset name, through L3/L4.

    The default codec is the error-bounded ``lorenzo``: within ``tol`` of the stored values, and
    lossless (zstd) at ``tol=0`` or for integer data. Tiers default to off (``l3=l4=0``), which is what
    an embedded service next to worker tiers wants; ``tierscope serve`` turns them on. ``device``: where
    blocks are encoded, "auto" (the GPU when CuPy sees one), "cpu" or "gpu" (an error now without one);
    the frames are the same byte for byte either way. ``adapt``: answer a user's L3 miss with whatever
    reaches the client first given the link throughput it reports (``choice.Costs``): the raw block (then
    encoded for L3 in the background), a frame at a tighter tol held in L3, or the frame encoded at tol.
    ``planner``: where prefetch plans are made, "thread" (a thread of this process) or "process" (a child
    process at nice 19, sharing no GIL with the loop: ``planner_process.py``; ``tierscope serve``'s).
    ``prefetch_loads``: where prefetch reads (and their encodes) of blocks L4 lacks run, "thread" (the
    prefetch threads) or "process" (``prefetch_workers`` child processes at nice 19:
    ``loads_process.py``; ``tierscope serve``'s); with a GPU encoding, threads.
    """

    def __init__(
        self,
        origins: Iterable[Origin],
        codec_name: str = "lorenzo",
        *,
        l3: int | str = 0,
        l4: int | str = 0,
        policy: str = "lru",
        prefetch: str = "off",
        workers: int = 4,
        prefetch_workers: int = 2,
        max_positions: int = 1024,
        plan_limit: int = 512,
        plan_ttl: float = PLAN_TTL_S,
        device: str = "auto",
        adapt: bool = False,
        planner: str = "thread",
        prefetch_loads: str = "thread",
    ) -> None:
        if planner not in PLANNERS:
            raise ValueError(f"planner must be one of {', '.join(PLANNERS)}, got {planner!r}")
        if prefetch_loads not in PREFETCH_LOADS:
            raise ValueError(
                f"prefetch_loads must be one of {', '.join(PREFETCH_LOADS)}, got {prefetch_loads!r}")
        self.planner, self.prefetch_loads = planner, prefetch_loads
        self.encode_device = resolve_device(device, "device")
        self.adapt = adapt
        self._origins: dict[str, Origin] = {}
        for origin in origins:
            if origin.name in self._origins:
                raise ValueError(f"two stores are both named {origin.name!r}")
            self._origins[origin.name] = origin
        codec.get_codec(codec_name)
        if workers < 1 or prefetch_workers < 1:
            raise ValueError(f"workers and prefetch_workers must be >= 1, got {workers}, {prefetch_workers}")
        self.codec_name = codec_name
        self.workers, self.prefetch_workers, self.plan_limit = workers, prefetch_workers, plan_limit
        self.plan_ttl = plan_ttl
        check_policy(policy)
        self.l3: TierCache[_Encoded] = TierCache(parse_size(l3, "l3"), "l3", policy=policy)
        self.l4: TierCache[_Raw] = TierCache(parse_size(l4, "l4"), "l4", policy=policy)
        self.prefetch_mode = check_prefetch(prefetch)
        self.max_positions = max_positions
        # the current views per (dataset, variable), as the planner last handed them back
        self._views: dict[tuple[str, str], Views | None] = {}
        # the box of the view last handed to the planner per position, the most recent max_positions: a
        # request repeating it does not wake the planner
        self._handed: OrderedDict[PositionKey, Box] = OrderedDict()
        self.l3.set_distance(lambda key: (key[:2], key[4]), self._views.get)  # (dataset, variable)
        self.l4.set_distance(lambda key: (key[:2], key[2]), self._views.get)
        self._epoch = 0  # configurations so far: the planner's results for an older one are dropped
        self._positions = 0  # positions the planner holds, as it last said
        self._stats = ServerStats()
        self.queue = PrefetchQueue(plan_ttl)
        self._tols: dict[tuple[str, str], OrderedDict[float, None]] = {}  # recent tols per variable
        self.costs = Costs(workers)
        self._background: set[asyncio.Task] = set()  # L3 encodes of blocks answered raw
        self._user_requests = 0  # running user requests: prefetch waits until there are none
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # ------------------------------------------------------------------ lifecycle (on the owning loop)
    async def start(self) -> None:
        """Start pools and prefetch workers on the running loop, which then owns this service."""
        if self._loop is not None:
            raise RuntimeError("this BlockService is already running on an event loop")
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        self._user_pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tierscope-user")
        self._prefetch_pool = ThreadPoolExecutor(self.prefetch_workers, thread_name_prefix="tierscope-prefetch",
                                                 initializer=_nicer, initargs=(PREFETCH_NICE,))
        self._slots = asyncio.Semaphore(self.prefetch_workers)
        self._loads = (ProcessLoads(self.prefetch_workers)
                       if self.prefetch_loads == "process" and self.encode_device == "cpu" else None)
        self._user_idle = asyncio.Event()
        self._user_idle.set()
        self.queue = PrefetchQueue(self.plan_ttl)
        self._tasks = [asyncio.create_task(self._prefetch_worker()) for _ in range(self.prefetch_workers)]
        if self.planner == "process":  # delivers on the loop itself
            self._planner: Planner | ProcessPlanner = ProcessPlanner(self._apply, self.max_positions)
        else:
            self._planner = Planner(functools.partial(self._loop.call_soon_threadsafe, self._apply),
                                    self.max_positions)
        self._planned = 0  # views the planner has finished, as it last said
        self._handed.clear()  # a new planner: its positions start empty
        self._settling: list[tuple[int, asyncio.Future[None]]] = []  # (views to finish, waiter)
        self._planner.start()

    async def aclose(self) -> None:
        """Stop prefetching and wait for running reads/encodes; the service can be started again."""
        if self._loop is None:
            return
        self._planner.stop()  # on the loop, briefly: at most the view being planned
        tasks = [*self._tasks, *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # On the loop, briefly: at most the reads/encodes already running. Not via to_thread: at
        # interpreter exit (the transports' atexit close) the default executor takes no new work.
        for pool in (self._user_pool, self._prefetch_pool):
            pool.shutdown(wait=True)
        if self._loads is not None:
            self._loads.close()
        self._loop = self._loop_thread = None

    def close(self) -> None:
        """Close the origins (after ``aclose``)."""
        for origin in self._origins.values():
            origin.close()

    # ------------------------------------------------------------------ catalogue
    def datasets(self) -> list[str]:
        return sorted(self._origins)

    def origin(self, name: str) -> Origin:
        """A served dataset, or level ``k`` of one by the name ``NAME@k`` (``tierscope.levels``)."""
        origin = self._origins.get(name)
        if origin is not None:
            return origin
        base, k = split_level(name)
        if base in self._origins:
            try:
                return self._origins[base].level(k)
            except ValueError as exc:
                raise DatasetNotFoundError(f"no dataset named {name!r} is served here: {exc}") from None
        known = ", ".join(self.datasets()) or "none"
        raise DatasetNotFoundError(f"no dataset named {name!r} is served here (datasets: {known})")

    def info(self, name: str) -> DatasetInfo:
        return self.origin(name).info()

    def _request(self, dataset: str, variable: str, tol: float, codec_name: str | None,
                 purpose: str, link_bps: float | None = None) -> _Request:
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
        tol = check_tol(tol)
        codec_name = self.codec_name if codec_name is None else codec_name
        codec.get_codec(codec_name)
        origin = self.origin(dataset)
        info = origin.info().variable(variable)
        info.check_view_tol(tol)
        if link_bps is not None and not (math.isfinite(link_bps) and link_bps > 0):
            raise ValueError(f"the link throughput must be a positive number of bytes/s, got {link_bps!r}")
        return _Request(origin, info, tol, codec_name, link_bps if self.adapt and tol > 0 else None)

    def _tighter(self, dataset: str, variable: str, tol: float) -> list[float]:
        """The remembered tols of a variable up to ``tol``, loosest first."""
        return sorted((t for t in self._tols.get((dataset, variable), ()) if t <= tol), reverse=True)

    def _share(self, req: _Request) -> tuple[_Request, tuple[float, ...]]:
        """``req`` at the tol it is served at, and the remembered tols tighter than ``CLOSE`` x its own.

        Requests whose tols differ a little (a new tol each, all nearly equal) share frames: the loosest
        remembered tol within [tol * CLOSE, tol] serves the request (a miss is encoded there, so each block
        is encoded and kept once), and the other remembered tols in that range answer it too. Without one,
        ``req.tol`` is served; the ``MAX_TOLS`` tols served most recently per variable are remembered."""
        tighter = self._tighter(req.dataset, req.variable.name, req.tol)
        close = [t for t in tighter if t >= req.tol * CLOSE]
        tol = close[0] if close else req.tol
        tols = self._tols.setdefault((req.dataset, req.variable.name), OrderedDict())
        tols[tol] = None
        tols.move_to_end(tol)
        while len(tols) > MAX_TOLS:
            tols.popitem(last=False)
        return replace(req, tol=tol, close=tuple(close[1:])), tuple(t for t in tighter if t < req.tol * CLOSE)

    # ------------------------------------------------------------------ requests
    async def block(
        self,
        dataset: str,
        variable: str,
        index: BlockIndex,
        tol: float = 0.0,
        codec_name: str | None = None,
        purpose: str = "user",
        session: str | None = None,
        position: str | Sequence[Sequence[int]] | None = None,
        link_bps: float | None = None,
        moves: bool = True,
    ) -> BlockResult:
        """One encoded block at ``tol``; ``position`` (the session's current view: its blocks, or an
        ``X-Tierscope-Position`` header's text) steers prefetch; ``moves=False``: the request is no view
        of its own (a progressive view's coarse part), so it moves no position and plans nothing."""
        return (await self.batch(dataset, variable, [index], tol, codec_name, purpose, session,
                                 position, link_bps=link_bps, moves=moves, batch=False))[0]

    async def batch(
        self,
        dataset: str,
        variable: str,
        indices: Sequence[BlockIndex],
        tol: float = 0.0,
        codec_name: str | None = None,
        purpose: str = "user",
        session: str | None = None,
        position: str | Sequence[Sequence[int]] | None = None,
        *,
        link_bps: float | None = None,
        moves: bool = True,
        batch: bool = True,
    ) -> list[BlockResult]:
        """Many blocks of one variable in one call (at most ``MAX_BATCH``), served concurrently.

        ``link_bps``: the throughput the client measured on its link to here (bytes/s), for ``adapt``;
        ``moves``: as for ``block``."""
        tasks = self._start(dataset, variable, indices, tol, codec_name, purpose, session, position,
                            link_bps, moves, batch)
        # shielded: a client that hangs up does not cancel a load other requests may be waiting on
        return list(await asyncio.shield(asyncio.gather(*tasks)))

    async def batch_stream(
        self,
        dataset: str,
        variable: str,
        indices: Sequence[BlockIndex],
        tol: float = 0.0,
        codec_name: str | None = None,
        purpose: str = "user",
        session: str | None = None,
        position: str | Sequence[Sequence[int]] | None = None,
        *,
        link_bps: float | None = None,
        moves: bool = True,
    ) -> AsyncIterator[tuple[int, BlockResult]]:
        """``batch``, each block as soon as it is ready: (its place in ``indices``, its result), so no
        block waits for an unrelated one. Validation errors raise before the first."""
        tasks = self._start(dataset, variable, indices, tol, codec_name, purpose, session, position,
                            link_bps, moves, True)
        return self._as_completed(tasks)

    @staticmethod
    async def _as_completed(tasks: list[asyncio.Task]) -> AsyncIterator[tuple[int, BlockResult]]:
        async def numbered(place: int, task: asyncio.Task) -> tuple[int, BlockResult]:
            return place, await asyncio.shield(task)  # a gone client does not cancel a shared load

        try:
            for next_done in asyncio.as_completed([numbered(i, t) for i, t in enumerate(tasks)]):
                yield await next_done
        finally:  # the client left early: the loads run on; their errors are not worth a warning
            for task in tasks:
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _start(
        self, dataset: str, variable: str, indices: Sequence[BlockIndex], tol: float, codec_name: str | None,
        purpose: str, session: str | None, position: str | Sequence[Sequence[int]] | None,
        link_bps: float | None, moves: bool, batch: bool,
    ) -> list[asyncio.Task]:
        """Validate a request, move its session's position (unless ``moves`` is False: then its position
        header is ignored), and start one task per block. While a user request's tasks run, no prefetch
        load starts (prefetch waits for ``_user_idle``)."""
        if self._loop is None:
            raise RuntimeError("BlockService.start() must run on an event loop before serving blocks")
        req = self._request(dataset, variable, tol, codec_name, purpose, link_bps)
        if not 0 < len(indices) <= MAX_BATCH:
            raise ValueError(f"blocks must list 1 to {MAX_BATCH} block indices, got {len(indices)}")
        grid = req.variable.grid
        checked = [grid.check(index) for index in indices]
        if session is not None:
            check_session(session)
        req, tighter = self._share(req)
        if moves:
            self._observe(req, grid, session, position, checked if purpose == "user" else None)
        self._stats.requests[purpose] += len(checked)
        self._stats.batches += batch
        if purpose == "prefetch":
            return [asyncio.ensure_future(self._serve_prefetch(req, index, tighter)) for index in checked]
        tasks = [asyncio.ensure_future(self._serve_user(req, index, tighter)) for index in checked]
        self._user_requests += 1
        self._user_idle.clear()
        remaining = [len(tasks)]

        def finished(_: asyncio.Task) -> None:
            remaining[0] -= 1
            if not remaining[0]:
                self._user_requests -= 1
                if not self._user_requests:
                    self._user_idle.set()

        for task in tasks:
            task.add_done_callback(finished)
        return tasks

    async def raw_block(
        self, dataset: str, variable: str, index: BlockIndex, encode: Callable[[np.ndarray], T]
    ) -> tuple[T, str]:
        """One raw block through L4 and the origin (single flight, user pool), turned into ``encode(block)``
        on the same pool, and the tier that answered (``"l4"`` or ``"origin"``).

        For readers of the stored values in their own encoding rather than a frame (the zarr view,
        ``server/zarr_http.py``). It counts as a user request; it moves no position and plans no prefetch.
        """
        if self._loop is None:
            raise RuntimeError("BlockService.start() must run on an event loop before serving blocks")
        origin = self.origin(dataset)
        # the store's values as stored: a pre-encoded store's are its frames decoded (within stored_tol)
        req = _Request(origin, origin.info().variable(variable), 0.0, self.codec_name)
        index = req.variable.grid.check(index)
        self._stats.requests["user"] += 1
        raw, tier = await asyncio.shield(self._raw_block(req, index, False))
        self._stats.served_by[tier] += 1
        encoded, _ = await self._run(False, encode, raw.array)
        return encoded, tier

    async def _serve_user(self, req: _Request, index: BlockIndex, tighter: tuple[float, ...]) -> BlockResult:
        result = await self._serve(req, index, False, tighter)
        self._stats.served_by[result.tier] += 1
        return result

    async def _serve_prefetch(self, req: _Request, index: BlockIndex, tighter: tuple[float, ...]) -> BlockResult:
        await self._user_idle.wait()
        async with self._slots:
            result = await self._serve(req, index, True, tighter)
        self._stats.served_by[result.tier] += 1
        return result

    async def _serve(self, req: _Request, index: BlockIndex, prefetch: bool,
                     tighter: tuple[float, ...] = ()) -> BlockResult:
        keys = req.l3_keys(index)
        cached = self.l3.get_first(keys, prefetch) or self._tighter_frame(req, index, tighter, prefetch)
        if cached is not None:
            return BlockResult(cached.frame, "l3", 0.0, 0.0, True)
        raw_nbytes = math.prod(req.variable.block) * req.variable.dtype.itemsize
        if (not prefetch and keys[0] not in self.l3
                and self.costs.send_raw(self._ratio_key(req), raw_nbytes, req.link_bps)):
            return await self._send_raw(req, index)
        encoded = await self.l3.aget_or_load(keys[0], lambda: self._load_frame(req, index, prefetch), prefetch)
        shared = self.l3.peek(keys[0]) is encoded
        return BlockResult(encoded.frame, encoded.tier, encoded.read_s, encoded.encode_s, shared)

    @staticmethod
    def _ratio_key(req: _Request) -> tuple:
        return (req.dataset, req.variable.name, req.tol, req.codec)

    def _tighter_frame(self, req: _Request, index: BlockIndex, tighter: Sequence[float],
                       prefetch: bool) -> _Encoded | None:
        """The smallest frame at a ``tighter`` tol in L3, when sending it to a client that said its link
        beats encoding (a hit: counted)."""
        if req.link_bps is None:
            return None
        keys = req.l3_keys(index, tighter)[1:]
        frames = [(len(f.frame), key) for key in keys if (f := self.l3.peek(key)) is not None]
        if not frames:
            return None
        size, key = min(frames)
        raw_nbytes = math.prod(req.variable.block) * req.variable.dtype.itemsize
        if not self.costs.send_tighter(size, self._ratio_key(req), raw_nbytes, req.link_bps):
            return None
        return self.l3.get_first([key], prefetch)

    async def _send_raw(self, req: _Request, index: BlockIndex) -> BlockResult:
        """Answer with the raw block (lossless: within every tol), then encode it for L3 in the background
        (as prefetch work: after user requests)."""
        raw, tier = await self._raw_block(req, index, False)
        frame, encode_s = await self._run(False, codec.encode, raw.array, 0.0, codec="raw")
        self._stats.raw_sent += 1
        if len(self._background) < self.plan_limit:
            task = asyncio.create_task(self._fill_l3(req, index))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return BlockResult(frame, tier, 0.0 if tier == "l4" else raw.read_s, encode_s)

    async def _fill_l3(self, req: _Request, index: BlockIndex) -> None:
        await self._user_idle.wait()
        async with self._slots:
            try:
                await self._serve(req, index, True)
            except Exception:  # the user has the block already; a failed fill only costs a later encode
                logger.warning("background encode of %s %s failed", req.variable.name, index, exc_info=True)

    async def _load_frame(self, req: _Request, index: BlockIndex, prefetch: bool) -> _Encoded:
        """An L3 miss: a pre-encoded store's frame as stored, else the raw block (L4) encoded at tol."""
        if req.variable.stored_tol:
            frame, read_s = await self._run(prefetch, req.origin.read_frame, req.variable.name, index)
            self._count_read(read_s)
            return _Encoded(frame, "origin", read_s, 0.0)
        in_child: list[Loaded] = []  # the frame, when a child reads the block for L4 and encodes it
        raw, tier = await self._raw_block(req, index, prefetch, in_child)
        if in_child:
            frame, encode_s = in_child[0].frame, in_child[0].encode_s
        else:
            frame, encode_s = await self._run(prefetch, codec.encode, raw.array, req.tol, codec=req.codec,
                                              device=self.encode_device)
        self.costs.encoded(self._ratio_key(req), raw.array.nbytes, len(frame), encode_s)
        self._stats.encodes += 1
        self._stats.stages["encode"].add(encode_s)
        return _Encoded(frame, tier, 0.0 if tier == "l4" else raw.read_s, encode_s)

    async def _raw_block(self, req: _Request, index: BlockIndex, prefetch: bool,
                         in_child: list[Loaded] | None = None) -> tuple[_Raw, str]:
        """The raw block through L4 (single flight) and the tier that had it: ``"l4"`` or ``"origin"``.
        ``in_child``: a prefetch load that a child reads also encodes the block there, into this list."""
        key4 = (req.dataset, req.variable.name, index)
        hit = self.l4.peek(key4) is not None  # no await before the lookup: still true there
        raw = await self.l4.aget_or_load(key4, lambda: self._read(req, index, prefetch, in_child), prefetch)
        return raw, "l4" if hit else "origin"

    async def _read(self, req: _Request, index: BlockIndex, prefetch: bool,
                    in_child: list[Loaded] | None = None) -> _Raw:
        spec = self._child_spec(req) if prefetch else None
        if spec is None:
            array, read_s = await self._run(prefetch, req.origin.read_block, req.variable.name, index)
        else:
            loaded = await self._load_in_child(spec, req, index, in_child is not None)
            if loaded is None:  # the children are gone: this server's threads from now on
                return await self._read(req, index, prefetch)
            array, read_s = loaded.raw, loaded.read_s
            if in_child is not None:
                in_child.append(loaded)
        array = np.asarray(array)
        array.flags.writeable = False  # shared by every later encode of this block
        self._count_read(read_s)
        return _Raw(array, read_s)

    def _child_spec(self, req: _Request) -> OriginSpec | None:
        """How a child opens this request's origin, when prefetch loads run in children and one can."""
        return None if self._loads is None else origin_spec(req.origin)

    async def _load_in_child(self, spec: OriginSpec, req: _Request, index: BlockIndex,
                             encode: bool) -> Loaded | None:
        """A block read by a child (and encoded at the request's tol if ``encode``); None if the children
        died: then the threads take over (logged once)."""
        loads = self._loads
        try:
            return await loads.load(spec, req.variable.name, index, req.tol if encode else None, req.codec)
        except BrokenProcessPool:
            if self._loads is loads:
                logger.error("a prefetch load process died: prefetch reads and encodes go on in threads")
                self._loads = None
                loads.close(wait=False)
            return None

    def _count_read(self, read_s: float) -> None:
        self._stats.origin_reads += 1
        self._stats.stages["read"].add(read_s)

    async def _run(self, prefetch: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
        """Run ``fn`` in the user or prefetch pool; record the wait for a thread; return its duration."""
        pool = self._prefetch_pool if prefetch else self._user_pool
        submitted = time.perf_counter()

        def job() -> tuple[T, float, float]:
            start = time.perf_counter()
            return fn(*args, **kwargs), start, time.perf_counter()

        result, start, end = await asyncio.get_running_loop().run_in_executor(pool, job)
        self._stats.stages["queue"].add(start - submitted)
        return result, end - start

    # ------------------------------------------------------------------ positions and prefetch
    def _observe(self, req: _Request, grid: BlockGrid, session: str | None,
                 position: str | Sequence[Sequence[int]] | None,
                 default: Sequence[BlockIndex] | None) -> None:
        """Check the view (the position header's text or blocks, else a user request's own blocks) and
        hand it to the planner, which moves the session's position and replans off the loop."""
        if position is not None and len(position):
            count = position.count(";") + 1 if isinstance(position, str) else len(position)
            if count > MAX_POSITION_BLOCKS:
                raise ValueError(
                    f"X-Tierscope-Position lists {count} blocks, at most {MAX_POSITION_BLOCKS} allowed")
            try:
                box = (_header_box if isinstance(position, str) else _view_box)(grid, position)
            except BlockIndexError as exc:
                raise ValueError(f"X-Tierscope-Position: {exc}") from None
        elif default:  # checked already: only its box
            box = Box(tuple(map(min, zip(*default))), tuple(map(max, zip(*default))))
        else:
            return
        if self.prefetch_mode == "off" and self.l3.policy != "distance":
            return  # validated, but nothing plans or evicts by position: no need to track it
        key = (session or ANONYMOUS, req.dataset, req.variable.name, req.tol)
        moved = self._handed.get(key) != box
        self._handed[key] = box
        self._handed.move_to_end(key)
        if len(self._handed) > self.max_positions:
            self._handed.popitem(last=False)
        self._planner.observe(View(key, req.variable, box, req.codec, self.prefetch_mode,
                                   self.l3.policy == "distance", TierRoom.of(self.l3), TierRoom.of(self.l4),
                                   self.plan_limit, self._epoch), wake=moved)

    def _apply(self, delivery: Delivery) -> None:
        """A planner's result, on the loop: the position's new plan replaces its queued one (the rest is
        cancelled), a position pushed out of the table loses its plan, and the tiers re-rank the
        variables whose views changed. O(1) but for the queue taking the plan."""
        planned = delivery.planned
        if planned is not None and planned.epoch == self._epoch:
            if planned.dropped is not None:
                self._stats.prefetch["cancelled"] += self.queue.replace(planned.dropped, ())
            for variable, views in planned.views.items():
                self._views[variable] = views
                self._views_moved(variable)
            if planned.items is not None:
                self._stats.prefetch["planned"] += len(planned.items)
                self._stats.prefetch["cancelled"] += self.queue.replace(planned.key, planned.items)
        if delivery.epoch == self._epoch:
            self._positions = delivery.positions
        self._planned = delivery.done
        while self._settling and self._settling[0][0] <= self._planned:
            _, waiter = self._settling.pop(0)
            if not waiter.done():
                waiter.set_result(None)

    async def settled(self) -> None:
        """Wait until the planner has handed back every view observed so far: then the stats count their
        plans and the queue holds them."""
        target = self._planner.issued if self._loop is not None else 0
        if target > self._planned:
            self._planner.wake()  # views that repeated their position's last one wait for a wake
            waiter = asyncio.get_running_loop().create_future()
            self._settling.append((target, waiter))
            await waiter

    def _views_moved(self, variable: tuple[str, str]) -> None:
        """A (dataset, variable)'s session views changed: L3 and L4 re-rank its blocks when next evicting."""
        self.l3.moved(variable)
        self.l4.moved(variable)

    async def _prefetch_worker(self) -> None:
        while True:
            item = await self.queue.get()
            req, to_l3 = self._prefetch_request(item)
            if self._held(req, item.index, to_l3):
                self._stats.prefetch["skipped"] += 1
                await asyncio.sleep(0)  # one lookup per turn of the loop, never a whole plan of held blocks
                continue
            await self._user_idle.wait()  # user requests first: the item waits, and may expire
            async with self._slots:
                self._stats.prefetch["issued"] += 1
                try:
                    if to_l3:
                        await self._serve(req, item.index, True)
                    else:
                        await self._raw_block(req, item.index, True)
                except Exception:  # a failed prefetch must never stop the worker
                    self._stats.prefetch["errors"] += 1
                    logger.warning("prefetch of %s failed", item, exc_info=True)

    def _prefetch_request(self, item: PrefetchItem) -> tuple[_Request, bool]:
        """A planned block as a request (with the close tols whose frames answer it), and whether it goes
        to L3 (a stored frame goes to L3 only)."""
        origin = self.origin(item.dataset)
        variable = origin.info().variable(item.variable)
        tighter = self._tighter(item.dataset, item.variable, item.tol)
        close = tuple(t for t in tighter if item.tol * CLOSE <= t < item.tol)
        req = _Request(origin, variable, item.tol, item.codec, close=close)
        return req, item.to_l3 or bool(variable.stored_tol)

    def _held(self, req: _Request, index: BlockIndex, to_l3: bool) -> bool:
        """Whether the tier a planned block fills holds it already (L3: at its tol or a close tighter one).
        A prefetch hit, not counted, keeps the block recent: the plan wants it near the view."""
        if to_l3:
            return self.l3.get_first(req.l3_keys(index), prefetch=True) is not None
        return self.l4.get_first([(req.dataset, req.variable.name, index)], prefetch=True) is not None

    # ------------------------------------------------------------------ stats and configuration
    def _on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the owning loop (state is only touched there), waiting from other threads, once
        the planner has handed back the views observed so far (on the loop, ``settled`` first)."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            return fn()

        async def call() -> T:
            await self.settled()
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=30)

    def stats(self) -> dict[str, Any]:
        """Requests, tier hits and occupancy, prefetch accounting, stage-time distributions."""

        def collect() -> dict[str, Any]:
            stats = self._stats.as_dict()
            tiers = {"l3": self.l3.info(), "l4": self.l4.info()}
            stats["prefetch"]["used"] = sum(t["prefetch_used"] for t in tiers.values())
            stats["prefetch"]["wasted"] = sum(t["prefetch_wasted"] for t in tiers.values())
            self.queue.expire()
            stats["prefetch"]["expired"] = self.queue.expired
            stats["prefetch"]["queued"] = len(self.queue)
            stats["tiers"] = tiers
            stats["sessions"] = self._positions
            stats["config"] = self.config()
            return stats

        return self._on_loop(collect)

    def reset_stats(self) -> None:
        def reset() -> None:
            self._stats = ServerStats()
            self.queue.expired = 0
            self.l3.reset_stats()
            self.l4.reset_stats()

        self._on_loop(reset)

    def config(self) -> dict[str, Any]:
        return {
            "l3": self.l3.capacity,
            "l4": self.l4.capacity,
            "policy": self.l3.policy,
            "prefetch": self.prefetch_mode,
            "codec": self.codec_name,
            "encode_device": self.encode_device,
            "workers": self.workers,
            "prefetch_workers": self.prefetch_workers,
            "planner": self.planner,
            "prefetch_loads": self.prefetch_loads,
        }

    async def configure(
        self,
        l3: int | str | None = None,
        l4: int | str | None = None,
        policy: str | None = None,
        prefetch: str | None = None,
        drop_page_cache: bool = False,
    ) -> dict[str, Any]:
        """Re-initialise: apply new sizes/policy/prefetch, clear tiers, positions, queue and stats.

        Everything is validated before anything changes. ``drop_page_cache`` asks each origin that can
        (``origin.drop_page_cache()``) to evict its files from the OS page cache, for cold-cache runs.
        """
        l3_size = None if l3 is None else parse_size(l3, "l3")
        l4_size = None if l4 is None else parse_size(l4, "l4")
        policy = None if policy is None else check_policy(policy)
        mode = None if prefetch is None else check_prefetch(prefetch)
        if not isinstance(drop_page_cache, bool):
            raise ValueError(f"drop_page_cache must be true or false, got {drop_page_cache!r}")
        for tier, size in ((self.l3, l3_size), (self.l4, l4_size)):
            tier.reconfigure(capacity=size, policy=policy)
            tier.clear()
        self.prefetch_mode = mode or self.prefetch_mode
        self._epoch += 1  # the planner starts its positions over; its results for the old ones are dropped
        self._views.clear()
        self._handed.clear()
        self._positions = 0
        self.queue.clear()
        self._tols.clear()
        dropped = []
        if drop_page_cache:
            for origin in self._origins.values():
                if hasattr(origin, "drop_page_cache"):
                    await asyncio.to_thread(origin.drop_page_cache)
                    dropped.append(origin.name)
        self.reset_stats()
        return {**self.config(), "page_cache_dropped": dropped}
