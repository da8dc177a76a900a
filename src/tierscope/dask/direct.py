"""Direct reads: a view skips the Dask graph; each owner answers for its blocks, loading what it lacks.

A graph is a scheduler round trip — submitted, placed, dispatched to the owners, gathered back — which
took 30-80 ms per view on a busy 2-core machine even when every block was an L1 hit
(docs/benchmarks-harness.md), and a cold view through it costs a task, a request and a decode per block,
one after the other on each worker thread. Instead the client asks each owner worker once, over Dask's
own connection pool (worker handler ``tierscope_read``), for its blocks' parts. An owner copies L1 parts
at once; blocks it lacks come in one batch request (the server works on them side by side) and every
block is decoded in parallel (``WorkerTiers.read_loading``), so a cold view is one pipeline per owner.
With ``tierscope.direct-read.load`` off, an owner answers only when it holds all of its share, and
otherwise answers None and counts nothing; under ``copies_only`` it answers only from L1 copies, and a
read not answered in full raises ``NotHeldError`` instead of taking the graph. Before the reads the
client tells the scheduler plugin the view (stream message ``tierscope-view``), so prefetch moves on
exactly as after a graph. Blocks whose owner did
not answer (in time) load through the usual graph, as ``ReportedBlockLoadTask``s: placed on their owners,
not taken for a new view, joining any fetch still in flight there.

Only for clients that ``tierscope.connect`` set up (their workers have the handler) and for basic
selections with unit steps; every other read takes the graph. The view message rides the client's
batched stream to the scheduler (``_compat.send_to_scheduler``, private: the stream every graph takes;
tests/test_direct.py covers it), so it costs no round trip and arrives in order with the graphs.

A read made under ``cancellable(cancel)`` carries an id; setting ``cancel`` (a newer view made it useless)
sends each owner ``tierscope_cancel`` with that id, and the owner stops fetching and decoding that read.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
import uuid
import weakref
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from distributed.protocol.serialize import ToPickle

from tierscope import config
from tierscope._compat import send_to_scheduler
from tierscope.client.source import Source
from tierscope.dask.graph import block_array
from tierscope.dask.scheduler import owner_of
from tierscope.grid import BlockGrid, BlockIndex
from tierscope.prefetch import Box
from tierscope.errors import NotHeldError, ReadCancelledError
from tierscope.protocol import CANCEL_OP, READ_OP, VIEW_OP, BlockSpec

__all__ = ["Cancel", "Piece", "cancellable", "connected", "copies_only", "disable", "enable", "pieces", "read",
           "unreported", "warm"]

logger = logging.getLogger(__name__)

CANCEL_TIMEOUT_S = 5.0  # an owner told to stop a read that does not acknowledge within this is left be


class Piece(NamedTuple):
    """The part of one block a selection takes, and where that part goes in the result."""

    index: BlockIndex
    part: tuple[slice, ...]  # within the block
    dest: tuple[slice, ...]  # within the result (integer keys kept as length-1 axes)
    source: tuple[slice, ...]  # within the whole array


def pieces(grid: BlockGrid, key: Sequence[int | slice]) -> tuple[list[Piece], tuple[int, ...]] | None:
    """The pieces of a basic selection and the result's shape (integer keys as length 1), or None when
    the selection is empty or steps by anything but 1."""
    if len(key) != grid.ndim:
        return None
    ranges = []
    for k, n in zip(key, grid.shape, strict=True):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step != 1 or start >= stop:
                return None
        else:
            start = int(k) + n if int(k) < 0 else int(k)
            if not 0 <= start < n:
                return None
            stop = start + 1
        ranges.append((start, stop))
    per_axis = []
    for (start, stop), b in zip(ranges, grid.block, strict=True):
        axis = []
        for i in range(start // b, (stop - 1) // b + 1):
            lo, hi = max(start, i * b), min(stop, (i + 1) * b)
            axis.append((i, slice(lo - i * b, hi - i * b), slice(lo - start, hi - start), slice(lo, hi)))
        per_axis.append(axis)
    out = [
        Piece(*(tuple(a[j] for a in combo) for j in range(4)))
        for combo in itertools.product(*per_axis)
    ]
    return out, tuple(stop - start for start, stop in ranges)


class _Workers:
    """One client's sorted worker addresses, refreshed every ``tierscope.direct-read.workers-ttl`` or after
    a failed ask, and the workers whose last ask failed (not asked again for
    ``tierscope.direct-read.failed-backoff``: their blocks take the
    graph, so a departed worker costs one timeout, not one per view)."""

    def __init__(self, client: Any) -> None:
        self.client = weakref.ref(client)
        self.addresses: list[str] = []
        self.fetched = -float("inf")
        self.failed: dict[str, float] = {}


_lock = threading.Lock()
_enabled: dict[str, _Workers] = {}  # client id -> its workers, for clients still open


def enable(client: Any) -> None:
    """Let this client's views read directly (``connect`` gave its workers the handler).

    Entries of clients since closed or collected are dropped here, so the table holds open clients only.
    """
    with _lock:
        for cid in [cid for cid, w in _enabled.items() if _closed(w.client())]:
            del _enabled[cid]
        _enabled.setdefault(client.id, _Workers(client))


def disable(client: Any) -> None:
    with _lock:
        _enabled.pop(client.id, None)


def _closed(client: Any) -> bool:
    return client is None or client.status in ("closing", "closed")


def connected() -> bool:
    """Whether views read directly here: the default client is one ``tierscope.connect`` set up."""
    return _client() is not None


def _client() -> Any:
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        return None
    if client.asynchronous or client.status != "running" or client.id not in _enabled:
        return None
    return client


def _workers(client: Any, refresh: bool = False) -> _Workers | None:
    with _lock:
        entry = _enabled.get(client.id)
        if entry is None:
            return None
        stale = refresh or time.monotonic() - entry.fetched > config.get_seconds("direct-read.workers-ttl")
    if stale:
        addresses = sorted(client.scheduler_info(n_workers=-1)["workers"])
        with _lock:
            entry.addresses, entry.fetched = addresses, time.monotonic()
    return entry


async def _ask_owners(
    client: Any, spec: BlockSpec, shares: dict[str, list[Piece]], timeout: float, load: bool, view: list,
    cancel: Cancel | None = None, copies: bool = False,
) -> dict[str, Any]:
    """Each owner's parts (a sequence); None where it left them to the graph or took too long; False where
    asking failed (a worker gone, or without the handler: not asked again for a while). ``cancel`` set
    first: the owners are told to stop (``CANCEL_OP``) and ``ReadCancelledError`` is raised."""
    read_id = uuid.uuid4().hex if cancel is not None else None

    async def ask(worker: str, share: list[Piece]) -> Sequence[np.ndarray] | None | bool:
        wire = [[list(p.index), [[s.start, s.stop] for s in p.part]] for p in share]
        try:  # the pool's connect retries a gone worker for 30 s: bounded here
            reply = await asyncio.wait_for(
                getattr(client.rpc(worker), READ_OP)(spec=ToPickle(spec), parts=wire, load=load,
                                                     session=client.id, view=view, read=read_id,
                                                     copies=copies), timeout)
        except asyncio.TimeoutError:  # still loading (a slow server?): the graph's loads join its fetches
            logger.debug("direct read from %s timed out after %.1f s", worker, timeout)
            return None
        except Exception as exc:  # gone, closing: its blocks take the graph
            logger.debug("direct read from %s failed: %r", worker, exc)
            return False
        if not isinstance(reply, dict):  # None: the worker has no such handler
            return False
        return reply.get("parts")

    asks = asyncio.gather(*(ask(w, s) for w, s in shares.items()))
    if cancel is not None:
        stop = asyncio.ensure_future(cancel.wait())
        await asyncio.wait([asks, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not asks.done():
            asks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asks
            await asyncio.gather(*(_stop_read(client, w, read_id) for w in shares))
            raise ReadCancelledError(f"the read of {len(shares)} owners' blocks of {spec.variable!r} "
                                     "was cancelled")
    answers = await asks
    return dict(zip(shares, answers, strict=True))


async def _stop_read(client: Any, worker: str, read_id: str) -> None:
    """Tell an owner to stop a read: it drops the rest of its fetch and decodes (best effort, bounded)."""
    try:
        await asyncio.wait_for(getattr(client.rpc(worker), CANCEL_OP)(read=read_id), CANCEL_TIMEOUT_S)
    except Exception as exc:  # gone, or slow: its read ends on its own
        logger.debug("cancelling direct read %s on %s failed: %r", read_id, worker, exc)


class Cancel:
    """A stop signal for the direct reads made under ``cancellable``, set from any thread. Reads waiting
    on an event loop are woken there (``call_soon_threadsafe``): stopping costs no polling."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            self._set, waiters, self._waiters = True, self._waiters, []
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop closed: nobody waits there any more
                loop.call_soon_threadsafe(event.set)

    async def wait(self) -> None:
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            if self._set:
                return
            self._waiters.append(waiter)
        try:
            await waiter[1].wait()
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)


_cancel = threading.local()


@contextlib.contextmanager
def cancellable(cancel: Cancel) -> Iterator[None]:
    """Direct reads in this block (on this thread) stop when ``cancel`` is set: their owners drop the
    rest of their fetches and decodes, and the read raises ``ReadCancelledError``. For loads a newer view
    makes useless, like an older progressive view's level 0."""
    _cancel.on = cancel
    try:
        yield
    finally:
        _cancel.on = None


_unreported = threading.local()


@contextlib.contextmanager
def unreported() -> Iterator[None]:
    """Direct reads in this block (on this thread) are not views: they move no position, so they plan no
    prefetch, at the scheduler or the server. For loads that only serve a view, like a progressive view's
    coarse parts (the view's own level-0 read plans the coarse levels around it already)."""
    _unreported.on = True
    try:
        yield
    finally:
        _unreported.on = False


_copies = threading.local()


@contextlib.contextmanager
def copies_only() -> Iterator[None]:
    """Direct reads in this block (on this thread) take only what the owners hold decoded in L1, as
    copies: nothing is fetched, decoded or left to the graph. Where an owner lacks one of its blocks (or
    is backed off, or direct reads do not apply) the read raises ``NotHeldError``, having counted and
    moved nothing; a read answered in full reports its view then. For ``tierscope.progressive``: level 0,
    asked for beside the first part, is then the rest of the view."""
    _copies.on = True
    try:
        yield
    finally:
        _copies.on = False


def warm(source: Source) -> None:
    """Ready a connected client's workers for the first view of ``source``, without waiting for them: each
    opens its transport (a connection to the server, or the store), fetches the dataset's description and
    starts its decode threads (``WorkerTiers.warm``), so the first view costs what any cold view costs."""
    client = _client()
    if client is None:
        return
    _workers(client)  # the owner hash's worker list, fetched now rather than on the first view
    client.run(_warm_worker, source, wait=False)


async def _warm_worker(source: Source) -> None:
    """On a worker's event loop (a coroutine: ``Client.run(wait=False)`` takes only those); the warming
    runs in a thread of its own."""
    from tierscope.dask.tiers import current_tiers

    tiers = current_tiers()
    threading.Thread(target=tiers.warm, args=(source,), name="tierscope-warm", daemon=True).start()


class _Routed(NamedTuple):
    """Where a direct read of a selection goes."""

    parts: list[Piece]
    shape: tuple[int, ...]
    workers: _Workers
    shares: dict[str, list[Piece]]  # owner -> its pieces
    skipped: set[str]  # owners backed off after a failed ask: their pieces take the graph


def _route(client: Any, spec: BlockSpec, key: Sequence[int | slice], itemsize: int) -> _Routed | None:
    """The selection's pieces by owner (the rendezvous hash over the client's workers), or None where
    direct reads do not apply: a stepped or empty selection, one larger than
    ``tierscope.direct-read.max-bytes``, or no workers."""
    planned = pieces(spec.grid, key)
    if planned is None:
        return None
    parts, shape = planned
    if math.prod(shape) * itemsize > config.get_bytes("direct-read.max-bytes"):
        return None
    workers = _workers(client)
    if workers is None or not workers.addresses:
        return None
    shares: defaultdict[str, list[Piece]] = defaultdict(list)
    for piece in parts:
        shares[owner_of(spec, piece.index, workers.addresses)].append(piece)
    now = time.monotonic()
    with _lock:
        backoff = config.get_seconds("direct-read.failed-backoff")
        skipped = {w for w in shares if now - workers.failed.get(w, -math.inf) < backoff}
    return _Routed(parts, shape, workers, dict(shares), skipped)


def read(spec: BlockSpec, dtype: np.dtype, key: Sequence[int | slice]) -> np.ndarray | None:
    """The selection ``key`` of ``spec``'s variable, read directly where the owners hold it and
    through the graph elsewhere; None when direct reads do not apply (no connected client, a stepped
    or empty selection, or one larger than ``tierscope.direct-read.max-bytes``)."""
    client = _client()
    routed = _route(client, spec, key, np.dtype(dtype).itemsize) if client is not None else None
    copies = getattr(_copies, "on", False)
    if routed is None or copies and routed.skipped:
        if copies:
            raise NotHeldError(f"a copies-only read of {spec.variable!r} that direct reads cannot answer")
        return None
    parts, shape, workers, shares, skipped = routed
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    box = Box.of(p.index for p in parts)  # a box, not its blocks: the message stays small
    view = {"op": VIEW_OP, "spec": ToPickle(spec), "box": [box.lo, box.hi]}
    reported = not getattr(_unreported, "on", False)
    if reported and not copies:
        send_to_scheduler(client, view)
    asked = {w: share for w, share in shares.items() if w not in skipped}
    load = not copies and bool(config.get("direct-read.load"))
    # owners that load what they lack handle whole blocks, not just the selection's part of them
    handled = len({p.index for p in parts}) * spec.block_nbytes if load else nbytes
    timeout = config.get_seconds("direct-read.ask-timeout") + handled / config.get_bytes(
        "direct-read.ask-bytes-per-second")
    cancel = getattr(_cancel, "on", None)
    if cancel is not None and cancel.is_set():
        raise ReadCancelledError(f"the read of {len(parts)} blocks of {spec.variable!r} was cancelled")
    answers = client.sync(_ask_owners, client, spec, asked, timeout, load,
                          [box.lo, box.hi] if reported and not copies else None, cancel, copies)
    out = np.empty(shape, dtype=dtype)
    missing = [piece for w in skipped for piece in shares[w]]
    for worker, share in asked.items():
        got = answers[worker]
        if not isinstance(got, list | tuple) or len(got) != len(share):  # None: not all held; False: failed
            missing.extend(share)
            continue
        for piece, values in zip(share, got, strict=True):
            out[piece.dest] = values
    failed = [w for w, answer in answers.items() if answer is False]
    if failed:
        with _lock:
            workers.failed.update(dict.fromkeys(failed, time.monotonic()))
        _workers(client, refresh=True)  # maybe a worker left: hash over the current ones next time
    if missing and copies:
        raise NotHeldError(f"{len(missing)} of {len(parts)} parts of {spec.variable!r} not held decoded in L1")
    if reported and copies:
        send_to_scheduler(client, view)
    if missing and cancel is not None and cancel.is_set():
        raise ReadCancelledError(f"the read of {len(parts)} blocks of {spec.variable!r} was cancelled")
    if missing:
        import dask

        loads = block_array(spec, dtype, reported=True)
        for piece, values in zip(missing, dask.compute(*(loads[p.source] for p in missing)), strict=True):
            out[piece.dest] = values
    return out[tuple(0 if isinstance(k, int | np.integer) else slice(None) for k in key)]
