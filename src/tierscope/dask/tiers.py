"""Worker-side tiers: L1 holds decoded blocks, L2 encoded frames; a miss in both asks block service.

Each process has one ``WorkerTiers``: the tierscope worker plugin's on a Dask worker, a process-local one
elsewhere (dask's local schedulers, or no dask at all). Loads are single-flight per block key in each tier.
"""

from __future__ import annotations

import contextlib
import logging
import functools
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from tierscope import codec, config
from tierscope.cache import TierCache, Views
from tierscope.codec.device import import_cupy, resolve_device, to_host
from tierscope.config import tier_bytes
from tierscope.errors import ReadCancelledError
from tierscope.client.source import Source
from tierscope.grid import BlockGrid, BlockIndex
from tierscope.prefetch import Box
from tierscope.protocol import BlockSpec

__all__ = ["WorkerTiers", "configure_local_tiers", "current_tiers", "local_tiers"]

logger = logging.getLogger(__name__)

PLUGIN_NAME = "tierscope"
# A view of more blocks is told to the server as its two corners: the same box, a short header.
MAX_TOLD_BLOCKS = 256
# Variables (dataset, variable, tol) whose current view a worker remembers; the least recently told go
# first (their cached blocks then rank as unviewed, farthest, for the distance policy).
MAX_VIEWS = 256
# Tols per variable whose cached blocks a looser load looks through (a block within a tighter bound is
# within the looser one too): the most recently loaded.
MAX_TOLS = 8
# Reads of at most this many blocks decode in their own thread rather than the decode pool, so they never
# wait behind a bigger read's queued decodes (a progressive view's first part beside its level 0).
INLINE_DECODES = 4


class WorkerTiers:
    """L1 (decoded) over L2 (encoded) over the transport, with fetch and stage-time counters.

    User loads and prefetch loads share the tiers (single flight per block key across both). Each
    variable's current view (told by the scheduler plugin's plans) gives the ``distance`` policy its
    order and rides on every request to the block server, so the server's prefetch follows it too.

    ``device``: "auto" (the GPU when CuPy sees one), "cpu" or "gpu". On a GPU, frames decode there and
    L1 holds CuPy arrays in GPU memory (charged their ``nbytes``); loads hand out host NumPy copies.
    """

    def __init__(self, l1: int, l2: int, policy: str = "lru", device: str = "auto") -> None:
        self.device = resolve_device(device, "device")
        self._xp: Any = import_cupy() if self.device == "gpu" else np
        self.l1: TierCache[Any] = TierCache(l1, "l1", policy=policy)
        self.l2: TierCache[bytes] = TierCache(l2, "l2", policy=policy)
        for tier in (self.l1, self.l2):
            tier.set_distance(_locate, self._views_of)
        self._lock = threading.Lock()
        self._views: OrderedDict[tuple, tuple[str, tuple[BlockIndex, ...], Box, Views]] = OrderedDict()
        self._tols: dict[tuple, OrderedDict[float, None]] = {}  # (dataset, variable) -> recent tols
        self._pool: ThreadPoolExecutor | None = None
        self._user_loads = 0
        self.user_idle = threading.Event()
        self.user_idle.set()
        self.fetches = 0
        self.cancelled_reads = 0  # direct reads stopped by a cancel (``read_loading``'s ``stop``)
        # Seconds per stage of user loads, and apart from them of prefetch loads (which run while the
        # user looks at a view, so they must not be read as part of any view's time).
        self.stage_s = {"network": 0.0, "server": 0.0, "decode": 0.0}
        self.prefetch_stage_s = dict(self.stage_s)

    def load(self, spec: BlockSpec, index: BlockIndex, frame: bytes | None = None) -> np.ndarray:
        """One decoded block, as a private host copy (a cached block is never handed out); ``frame``: its
        frame, fetched already."""
        keys = self._keys(spec, index)
        with self._user_load():
            block = self.l1.get_first(keys) if len(keys) > 1 else None
            if block is None:
                block = self.l1.get_or_load(keys[0], lambda: self._decode(spec, index, keys, "user", frame))
            return block.copy() if self._xp is np else _host_copy(self._xp, block, spec.dtype)

    @contextlib.contextmanager
    def _user_load(self) -> Iterator[None]:
        """While a user load runs, prefetch waits (``user_idle``)."""
        with self._lock:
            self._user_loads += 1
            self.user_idle.clear()
        try:
            yield
        finally:
            with self._lock:
                self._user_loads -= 1
                if not self._user_loads:
                    self.user_idle.set()

    def read_loading(
        self, spec: BlockSpec, pieces: Sequence[tuple[BlockIndex, tuple[slice, ...]]],
        stop: threading.Event | None = None, moves: bool = True,
    ) -> list[np.ndarray]:
        """Parts of blocks, the missing ones fetched in one streamed batch (the server works on them side by
        side and sends each when ready) and each decoded as it arrives, all in parallel: a cold view's
        share of one worker as a pipeline, instead of a task, a request and a decode per block one after
        the other. ``stop`` set (the read was cancelled): at the next block the rest of the batch is
        dropped, decodes not started are not run, and ``ReadCancelledError`` is raised. ``moves=False``: the
        read is no view (``direct.unreported``), so its fetch moves no position at the server either."""
        indices = list(dict.fromkeys(index for index, _ in pieces))
        # a small read (a progressive view's coarse part) must not queue behind a big one's decodes
        submit = _run_now if len(indices) <= INLINE_DECODES else self._decoders().submit
        with self._user_load():
            wanted: dict[Hashable, BlockIndex] = {}
            decoding: dict[BlockIndex, Future] = {}
            for index in indices:
                keys = self._keys(spec, index)
                if any(key in self.l1 or key in self.l2 for key in keys):
                    decoding[index] = submit(self.load, spec, index)
                else:
                    wanted[keys[0]] = index
            if wanted:
                arriving = self.l2.load_stream(list(wanted), lambda keys: self._fetch_each(
                    spec, [wanted[k] for k in keys], moves), prefetch=False)
                with contextlib.closing(arriving):  # a stop drops the rest of the stream
                    for key, frame in arriving:
                        decoding[wanted[key]] = submit(self.load, spec, wanted[key], frame)
                        self._check(stop, decoding)
            for index in indices:  # one another load had in flight: joined by this load
                if index not in decoding:
                    decoding[index] = submit(self.load, spec, index)
            blocks = {}
            for index, future in decoding.items():
                self._check(stop, decoding)
                blocks[index] = future.result()
        return [np.ascontiguousarray(blocks[index][part]) for index, part in pieces]

    def _check(self, stop: threading.Event | None, decoding: dict[BlockIndex, Future]) -> None:
        """Raise ``ReadCancelledError`` once ``stop`` is set, its decodes not yet started cancelled."""
        if stop is None or not stop.is_set():
            return
        for future in decoding.values():
            future.cancel()
        with self._lock:
            self.cancelled_reads += 1
        raise ReadCancelledError(f"a direct read of {len(decoding)} blocks was cancelled")

    def warm(self, source: Source) -> None:
        """Ready this process for the first view of ``source``: its transport connected (the dataset's
        description fetched), the decode threads started and the codec's code paths loaded."""
        try:
            source.transport().info(source.dataset)
            self._decoders().submit(codec.decode, codec.encode(np.zeros((2, 2), np.float32), 0.5)).result()
        except Exception as exc:  # only an optimisation: the first view meets (and reports) any problem
            logger.info("warming for %s failed: %r", source.url, exc)

    def _decoders(self) -> ThreadPoolExecutor:
        """Threads that decode a view's blocks side by side (the codecs' kernels release the GIL)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="tierscope-decode")
            return self._pool

    def _keys(self, spec: BlockSpec, index: BlockIndex) -> list[Hashable]:
        """The block's key, then its keys at the tighter tols recently loaded of its variable: any of them
        answers the load (counted as a hit in the tier that holds it)."""
        key = spec.block_key(index)
        with self._lock:
            tols = self._tols.setdefault(key[:2], OrderedDict())
            tols[spec.tol] = None
            tols.move_to_end(spec.tol)
            while len(tols) > MAX_TOLS:
                tols.popitem(last=False)
            tighter = [tol for tol in tols if tol < spec.tol]
        return [key, *((*key[:2], tol, key[3]) for tol in tighter)]

    def read_cached(
        self, spec: BlockSpec, pieces: Sequence[tuple[BlockIndex, tuple[slice, ...]]]
    ) -> list[np.ndarray] | None:
        """Host copies of parts of blocks all held decoded in L1 (hits counted), else None.

        Cheap enough for the worker's event loop: lookups and copies of cached arrays, no fetch or decode.
        """
        blocks = self.l1.get_all([spec.block_key(index) for index, _ in pieces])
        if blocks is None:
            return None
        parts = [block[part] for block, (_, part) in zip(blocks, pieces, strict=True)]
        if self._xp is np:
            return [np.array(p) for p in parts]  # copies: a cached array is never handed out
        return [_host_copy(self._xp, p, spec.dtype) for p in parts]

    def held(self, spec: BlockSpec, indices: Sequence[BlockIndex]) -> bool:
        """Whether every block is in L1 or L2 (a load of them needs no fetch, unless one is evicted first)."""
        keys = [spec.block_key(index) for index in indices]
        return all(key in self.l1 or key in self.l2 for key in keys)

    def prefetch(self, spec: BlockSpec, blocks: Sequence[tuple[BlockIndex, bool]]) -> int:
        """Bring blocks into L2, and into L1 those marked ``decode``; returns how many were not there.

        The missing frames cross the transport in one batch request; blocks already cached or being
        loaded (by a user load, say) are left to that load.
        """
        wanted = [(spec.block_key(index), index, decode) for index, decode in blocks]
        wanted = [w for w in wanted if w[0] not in self.l1 and (w[2] or w[0] not in self.l2)]
        indices = {key: index for key, index, _ in wanted}
        frames = self.l2.load_many(list(indices), lambda keys: self._fetch_many(
            spec, [indices[k] for k in keys], "prefetch"))
        for key, index, decode in wanted:
            if decode:  # from the batch's own frame: L2 may be too small to have kept it
                self.user_idle.wait(config.get_seconds("prefetch-batch.user-wait"))  # user decodes first
                load = functools.partial(self._decode, spec, index, [key], "prefetch", frames.get(key))
                self.l1.get_or_load(key, load, prefetch=True)
        return len(wanted)

    def set_view(self, session: str, spec: BlockSpec, view: tuple[BlockIndex, ...]) -> None:
        """The session's current view of ``spec``'s variable (from the scheduler plugin's plan)."""
        key, box = _view_key(spec), Box.of(view)
        told = view if len(view) <= MAX_TOLD_BLOCKS else (box.lo, box.hi)
        with self._lock:
            old = self._views.get(key)
            self._views[key] = (session, told, box, Views([(box.lo, box.hi)], spec.time_axis))
            self._views.move_to_end(key)
            forgotten = [self._views.popitem(last=False)[0] for _ in range(len(self._views) - MAX_VIEWS)]
        moved = forgotten + ([key] if old is None or old[2] != box else [])
        for group in moved:  # the distance order of these variables' cached blocks changed
            self.l1.moved(group)
            self.l2.moved(group)

    def _views_of(self, group: tuple) -> Views | None:
        """What the distance policy measures a variable's cached blocks from (unviewed: None, inf hops)."""
        entry = self._views.get(group)
        return None if entry is None else entry[3]

    def _decode(
        self, spec: BlockSpec, index: BlockIndex, keys: Sequence[Hashable], purpose: str,
        frame: bytes | None = None,
    ) -> Any:
        """Decode the frame given, else one held in L2 under any of ``keys``, else fetched for ``keys[0]``."""
        prefetch = purpose == "prefetch"
        if frame is None and len(keys) > 1:
            frame = self.l2.get_first(keys, prefetch)
        if frame is None:
            frame = self.l2.get_or_load(keys[0], lambda: self._fetch(spec, index, purpose), prefetch=prefetch)
        t0 = time.perf_counter()
        block = codec.decode(frame, device=self.device)
        if self._xp is np:
            block.flags.writeable = False
        else:  # count the kernels' time, not just their launch
            self._xp.cuda.get_current_stream().synchronize()
        with self._lock:
            self._stages(purpose)["decode"] += time.perf_counter() - t0
        return block

    def _fetch(self, spec: BlockSpec, index: BlockIndex, purpose: str) -> bytes:
        session, view = self._position(spec)
        t0 = time.perf_counter()
        fetched = spec.source.transport().fetch(
            spec.source.dataset, spec.variable, index, spec.tol, purpose=purpose,
            session=session, position=view,
        )
        self._count_fetch(purpose, 1, time.perf_counter() - t0, fetched.server_s)
        return fetched.frame

    def _fetch_many(self, spec: BlockSpec, indices: list[BlockIndex], purpose: str) -> list[bytes]:
        """One batch round trip. The server serves a batch's blocks concurrently, so its wall time is
        the slowest block's, and the rest of the round trip is network."""
        session, view = self._position(spec)
        t0 = time.perf_counter()
        fetched = spec.source.transport().fetch_many(
            spec.source.dataset, spec.variable, indices, spec.tol, purpose=purpose,
            session=session, position=view,
        )
        self._count_fetch(purpose, len(fetched), time.perf_counter() - t0, max(f.server_s for f in fetched))
        return [f.frame for f in fetched]

    def _fetch_each(
        self, spec: BlockSpec, indices: list[BlockIndex], moves: bool
    ) -> Iterator[tuple[Hashable, bytes]]:
        """(block key, frame) pairs as they arrive from one streamed batch of a user read."""
        session, view = self._position(spec)
        t0, count, server_s = time.perf_counter(), 0, 0.0
        try:
            for index, fetched in spec.source.transport().fetch_each(
                spec.source.dataset, spec.variable, indices, spec.tol, purpose="user", session=session,
                position=view, moves=moves,
            ):
                count, server_s = count + 1, max(server_s, fetched.server_s)
                yield spec.block_key(index), fetched.frame
        finally:
            if count:
                self._count_fetch("user", count, time.perf_counter() - t0, server_s)

    def _count_fetch(self, purpose: str, blocks: int, elapsed: float, server_s: float) -> None:
        """A round trip's blocks, and its time split into the server's and the network's share."""
        with self._lock:
            self.fetches += blocks
            stages = self._stages(purpose)
            stages["server"] += server_s
            stages["network"] += max(elapsed - server_s, 0.0)

    def _stages(self, purpose: str) -> dict[str, float]:
        return self.stage_s if purpose == "user" else self.prefetch_stage_s

    def _position(self, spec: BlockSpec) -> tuple[str | None, tuple[BlockIndex, ...] | None]:
        entry = self._views.get(_view_key(spec))
        return (None, None) if entry is None else (entry[0], entry[1])

    def close(self) -> None:
        """Stop the decode threads (a worker plugin's teardown)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, object]:
        with self._lock:
            fetches, stage_s, prefetch_s = self.fetches, dict(self.stage_s), dict(self.prefetch_stage_s)
            cancelled = self.cancelled_reads
        return {"l1": self.l1.info(), "l2": self.l2.info(), "fetches": fetches, "cancelled_reads": cancelled,
                "stage_s": stage_s, "prefetch_stage_s": prefetch_s}


def _run_now(fn: Callable[..., Any], *args: Any) -> Future:
    """``fn(*args)`` run in this thread, as a finished future (the decode pool's ``submit``, inline)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


def _view_key(spec: BlockSpec) -> tuple:
    return (spec.source.cache_id, spec.variable, spec.tol)


def _locate(key: Hashable) -> tuple[tuple, BlockIndex]:
    """A block key's distance group (its variable's view key, as ``_view_key``) and block index."""
    return key[:3], key[3]


def _host_copy(xp: Any, block: Any, dtype: str) -> np.ndarray:
    """A GPU block on the host, in the variable's byte order (GPU arrays only have the native one)."""
    host = to_host(xp, block)
    want = np.dtype(dtype)
    return host.astype(want) if host.dtype != want and host.dtype == want.newbyteorder("=") else host


_local_lock = threading.Lock()
_local: WorkerTiers | None = None


def configure_local_tiers(l1: int, l2: int, policy: str = "lru", device: str = "auto") -> WorkerTiers:
    """Replace this process's tiers (used when no Dask worker plugin owns them)."""
    global _local
    with _local_lock:
        _local = WorkerTiers(l1, l2, policy, device)
        return _local


def local_tiers(memory_limit: int | None = None) -> WorkerTiers:
    """This process's own tiers, made on first use from dask.config's ``tierscope`` settings (sizes that
    are fractions taken of ``memory_limit``, or of the machine's memory)."""
    global _local
    with _local_lock:
        if _local is None:
            _local = WorkerTiers(tier_bytes(config.get("l1"), memory_limit, "l1"),
                                 tier_bytes(config.get("l2"), memory_limit, "l2"),
                                 config.get("policy"), config.get("device"))
        return _local


def current_tiers() -> WorkerTiers:
    """The tiers of the running Dask worker's plugin, else this process's own."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return local_tiers()
    plugin = worker.plugins.get(PLUGIN_NAME)
    return plugin.tiers if plugin is not None else local_tiers(worker.memory_manager.memory_limit)
