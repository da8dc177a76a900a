"""A worker's background prefetch: the plans the scheduler plugin sends, run behind user loads.

Plans arrive as stream messages on the worker's event loop; the handler only queues them, and one
background thread does the fetching and decoding, so the event loop never waits on I/O or a decode. Each
plan belongs to one position — (session, dataset, variable, tol) — and carries an epoch: a newer plan for
the same position drops the queued remainder of the older one (counted as cancelled). Before each batch
the thread waits until no user load is running on this worker, so user loads always go first; blocks
bound for L1 go before L2-only ones of any position; a batch of small blocks crosses the network in one
round trip.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

from tierscope import config
from tierscope.dask.tiers import WorkerTiers
from tierscope.protocol import PLAN_OP, BlockSpec
from tierscope.grid import BlockIndex

__all__ = ["Plan", "Prefetcher"]

logger = logging.getLogger(__name__)

# Positions whose newest epoch is remembered (to refuse a late, older plan); the least recent go first.
MAX_POSITIONS = 1024


@dataclass(frozen=True)
class Plan:
    """The blocks one worker should load for one session's position, most likely first."""

    epoch: int
    session: str
    spec: BlockSpec
    view: tuple[BlockIndex, BlockIndex]  # the corners of the session's current view box: the position
    # the plan is made for
    blocks: tuple[BlockIndex, ...]
    decode: tuple[bool, ...]  # per block: into L1 (decoded) too, or L2 (encoded) only

    @property
    def position(self) -> tuple:
        return (self.session, self.spec)


class Prefetcher:
    """Owns the queued plans of one worker and the thread that carries them out."""

    def __init__(self, tiers: WorkerTiers) -> None:
        self.tiers = tiers
        self._cond = threading.Condition()
        self._queues: dict[tuple, deque[tuple[Plan, BlockIndex, bool]]] = {}
        self._epochs: OrderedDict[tuple, int] = OrderedDict()
        self._closed = False
        self.counts = {"plans": 0, "issued": 0, "skipped": 0, "cancelled": 0, "failed": 0}
        self._thread = threading.Thread(target=self._run, name="tierscope-prefetch", daemon=True)
        self._thread.start()

    def submit(self, plan: Plan) -> None:
        """Queue a plan; it replaces what is left of older plans for the same position."""
        with self._cond:
            key = plan.position
            if plan.epoch <= self._epochs.get(key, -1):
                self.counts["cancelled"] += len(plan.blocks)
                return
            self._epochs[key] = plan.epoch
            self._epochs.move_to_end(key)
            while len(self._epochs) > MAX_POSITIONS:
                self.counts["cancelled"] += len(self._queues.pop(self._epochs.popitem(last=False)[0], ()))
            self.counts["plans"] += 1
            self.counts["cancelled"] += len(self._queues.pop(key, ()))
            self.tiers.set_view(plan.session, plan.spec, plan.view)
            if plan.blocks:  # an empty share only moves the position (and cancels the old queue)
                self._queues[key] = deque(zip((plan,) * len(plan.blocks), plan.blocks, plan.decode, strict=True))
                self._cond.notify()

    def queued(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _next(self) -> tuple[Plan, list[tuple[BlockIndex, bool]]] | None:
        """The next batch, taken once no user load runs, round robin over positions, those whose next
        block goes to L1 first; None once closed.

        A batch is the head of one position's queue, up to ``tierscope.prefetch-batch.blocks`` and ``.bytes`` of
        decoded blocks, all bound for L1 or all for L2 only: one round trip to the server for many small
        blocks, one at a time for big ones, and the next view's blocks never wait on L2-only ones.
        """
        while True:
            with self._cond:
                while not self._closed and not self._queues:
                    self._cond.wait()
            while not self.tiers.user_idle.wait(config.get_seconds("prefetch-batch.user-wait")):
                if self._closed:
                    return None
            with self._cond:
                if self._closed:
                    return None
                if not self._queues:  # a newer, empty share cancelled it all while users ran
                    continue
                # Blocks bound for L1 (some position's next view) before frames only L2 wants (a coarse
                # level's wide plan, the far part of any plan), and among those a coarsest level's first
                # (a progressive view's first part: a few small decodes, done once), then the finest
                # level's (the next full-resolution view); positions take turns within each.
                bound = [(not q[0][0].spec.coarsest, q[0][0].spec.level, turn, k)
                         for turn, (k, q) in enumerate(self._queues.items()) if q[0][2]]
                key = min(bound)[3] if bound else next(iter(self._queues))
                queue = self._queues.pop(key)
                plan = queue[0][0]
                size = max(1, min(config.get("prefetch-batch.blocks"),
                                  config.get_bytes("prefetch-batch.bytes") // max(plan.spec.block_nbytes, 1)))
                decode = queue[0][2]
                batch = []
                while queue and len(batch) < size and queue[0][2] == decode:
                    batch.append(queue.popleft()[1:])
                if queue:
                    self._queues[key] = queue  # to the back: positions take turns
                return plan, batch

    def _run(self) -> None:
        while (item := self._next()) is not None:
            plan, batch = item
            try:
                loaded = self.tiers.prefetch(plan.spec, batch)
            except Exception as exc:  # a prefetch failure must never reach the user; the load retries
                logger.warning("prefetch of %d blocks of %r failed: %s", len(batch), plan.spec.variable, exc)
                with self._cond:
                    self.counts["failed"] += len(batch)
                continue
            with self._cond:
                self.counts["issued"] += loaded
                self.counts["skipped"] += len(batch) - loaded

    def stats(self) -> dict[str, int]:
        """Plans received; blocks loaded (issued), already held (skipped), dropped by newer plans
        (cancelled), failed; queued now."""
        with self._cond:
            return {**self.counts, "queued": sum(len(q) for q in self._queues.values())}
