"""Server prefetch reads and encodes in child processes (``BlockService(prefetch_loads="process")``).

The prefetch pool's threads are niced, but a read or an encode is NumPy work in many small steps, each
taking the GIL back; a niced thread holding it while the OS runs something else makes the loop wait for
it (issue #11: skipping the prefetch reads and encodes took the loop's p99 lag under a flood from ~7 ms
to 4-6 ms). Here an L4 miss of a prefetch load runs in a child process at nice ``NICE``, which shares no
GIL with the loop: the child opens the block's origin from its location (once per dataset and level),
reads the block, encodes it when the load goes to L3, and sends back the raw block (for L4) and the frame
(for L3). The loop keeps every tier: the children hold no state but their open origins.

Only an origin that its location describes whole goes to a child (a local store, a ``sample://`` URL, a
URL without ``storage_options``), and only CPU encodes (a GPU encode stays in the server's process);
everything else runs in the prefetch threads as before. A child that dies breaks the pool: the service
logs it and goes on with threads. A child whose server process died (killed: no shutdown) ends within
``ORPHAN_POLL_S``.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import numpy as np

from tierscope import codec
from tierscope.grid import BlockIndex
from tierscope.levels import split_level
from tierscope.store.origin import Origin, open_origin

__all__ = ["NICE", "Loaded", "ProcessLoads", "origin_spec"]

NICE = 19  # the children's OS priority: they read and encode on CPU time the loop and user work leave
ORPHAN_POLL_S = 1.0  # how often a child checks that the server's process is still its parent
# The classes ``open_origin`` makes: a subclass (a test's, a user's) may read differently from its location.
_OPENED = frozenset({"tierscope.store.origin.ZarrOrigin", "tierscope.store.synthetic.SyntheticOrigin",
                     "tierscope.store.tiledb.TileDBOrigin", "tierscope.store.hdf5.HDF5Origin"})


class OriginSpec(NamedTuple):
    """What a child needs to open an origin itself: level 0's location and name, and the level."""

    location: str
    name: str
    level: int


class Loaded(NamedTuple):
    """A child's answer: the raw block, its frame (None for a load to L4 only) and the stage times."""

    raw: np.ndarray
    frame: bytes | None
    read_s: float
    encode_s: float


def origin_spec(origin: Origin) -> OriginSpec | None:
    """How a child opens ``origin``; None when its location does not describe it whole."""
    base = origin.base or origin
    if f"{type(base).__module__}.{type(base).__qualname__}" not in _OPENED or getattr(
            base, "_storage_options", None):
        return None
    return OriginSpec(base.location, base.name, split_level(origin.name)[1])


class ProcessLoads:
    """A pool of ``workers`` child processes that read (and encode) prefetched blocks."""

    def __init__(self, workers: int) -> None:
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_child, initargs=(NICE, os.getpid()))
        for _ in range(workers):  # start every child now (a spawn is ~1 s of imports): none when plans come
            self._pool.submit(_ready)

    async def load(self, spec: OriginSpec, variable: str, index: BlockIndex, tol: float | None,
                   codec_name: str) -> Loaded:
        """The block read by a child, and encoded at ``tol`` with ``codec_name`` unless ``tol`` is None."""
        return await asyncio.wrap_future(self._pool.submit(_load, spec, variable, index, tol, codec_name))

    @property
    def pids(self) -> list[int]:
        """The children's process ids (started on demand, up to ``workers``)."""
        return [process.pid for process in list((self._pool._processes or {}).values())]

    def close(self, wait: bool = True) -> None:
        """Stop the children once their running loads end (``wait``: until then); loads not started are
        cancelled."""
        self._pool.shutdown(wait=wait, cancel_futures=True)


# --------------------------------------------------------------------------- in the child
_origins: dict[OriginSpec, Origin] = {}  # the child's open origins: one per dataset level it was asked for


def _start_child(nice: int, parent: int) -> None:
    os.nice(nice)
    gc.freeze()  # the imports' objects: a collection never walks them again
    threading.Thread(target=_exit_with, args=(parent,), name="tierscope-orphan-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    """End this child once the server's process is gone, however it ended: a killed parent does not close
    the pool's queue for its children (each holds both ends), so they would wait on it for ever."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    os._exit(0)


def _ready() -> None:
    """Nothing: a child that ran it has started and imported what loads need."""


def _load(spec: OriginSpec, variable: str, index: BlockIndex, tol: float | None, codec_name: str) -> Loaded:
    origin = _origins.get(spec)
    if origin is None:
        origin = _origins[spec] = open_origin(spec.location, spec.name).level(spec.level)
    start = time.perf_counter()
    raw = np.asarray(origin.read_block(variable, index))
    read = time.perf_counter()
    frame = None if tol is None else codec.encode(raw, tol, codec=codec_name)
    return Loaded(raw, frame, read - start, time.perf_counter() - read)
