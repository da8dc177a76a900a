"""Prefetch across levels (issue #12): a view of one level also plans the dataset's coarser levels.

Level ``k`` has the block shape of level 0 on a grid ``2**k`` times smaller along each spatial axis, so
its blocks are 8x fewer per level (in 3-D) and each covers 8x more: a small share of the tiers holds the
coarsest level for many time steps, often all of them. The scheduler plugin's planning thread calls
``CoarsePlanner.plan`` on every new view of a dataset with levels: for each coarser level, coarsest
first, the view's box mapped onto the level (spatial axes divided, time unchanged), then the blocks
around it nearest first, so that after a jump anywhere a coarse answer already sits in its owner's L2
(``L1_SHARE`` 0: L1 is level 0's), and the coarsest level's decoded in L1 too (``COARSEST_L1_SHARE``).

Budgets: the coarse levels together may fill ``L1_SHARE`` of the workers' L1 and ``L2_SHARE`` of their
L2 (level 0's own plan keeps the rest); the coarsest level gets half of that, the next half of what is
left, and so on, the finest coarse level the remainder, and a level that needs less (its whole grid)
leaves its unused share to the finer ones. Owners are the rendezvous hash of the level's own blocks,
which puts the coarsest level of a small spatial grid on few workers, so each owner fills at most its
own part of each level's share (in proportion to its capacity). Work per view is bounded whatever the
dataset's size: at most ``max_blocks`` blocks enumerated over all levels (the coarsest level half of
them, each finer one half of what is left; taken from vectorised rings, ``prefetch.around``), counted in
``last["enumerated"]`` (the scheduler plugin's ``stats()["coarse"]`` adds them up, and keeps the most in
one view as ``max_enumerated``). A level whose mapped
box has not left the last plan's (same spatial blocks, time within a quarter of the plan's reach) is
not planned again: its plan is still being carried out, and steps inside one coarse block change nothing.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from tierscope.cache import entry_charge
from tierscope.grid import BlockIndex
from tierscope.levels import coarser_grid, level_name, split_level
from tierscope.prefetch import Box, around
from tierscope.protocol import BlockSpec

__all__ = ["COARSEST_L1_SHARE", "COUNTS", "L1_SHARE", "L2_SHARE", "CoarsePlanner", "LevelPlan", "add_counts",
           "level_box", "level_spec"]

# None of the workers' L1 for the coarse levels but the coarsest: decoded coarse blocks took L1 room and
# prefetch decodes from level 0's next view (its playback fell to 70-85% L1 hits); a coarse answer from L2
# costs one small decode.
L1_SHARE = 0.0
# ... and the coarsest level, a progressive view's first part, decoded into L1 within this share: its
# answer is then a copy, no decode on the owner's busy threads, and level 0 starts that much sooner. Its
# whole grid is small (1 block per time step of a z-slice: 16 MiB for 16 time steps), and decoded once.
# Not taken from level 0's plan (its L1 radius stays; in a small L1 one block less cost it a time step):
# L1 may be planned over by this much, and its policy evicts what is farthest.
COARSEST_L1_SHARE = 1 / 64
L2_SHARE = 1 / 4  # of the workers' L2: coarse frames, wide
MAX_REMEMBERED = 1024  # (session, level spec) last plans kept; the least recent go first
COUNTS = ("plans", "unchanged", "planned", "enumerated", "max_enumerated")


@functools.lru_cache(maxsize=256)  # every view asks again for the same few levels' specs
def level_spec(spec: BlockSpec, k: int) -> BlockSpec:
    """The spec of the same variable at level ``k`` (>= ``spec.level``): the dataset ``NAME@k``, whose
    blocks have their own cache keys, owners and position."""
    base = split_level(spec.source.dataset)[0]
    source = replace(spec.source, dataset=level_name(base, k))
    grid = coarser_grid(spec.grid, spec.level_axes, k - spec.level)
    return replace(spec, source=source, grid=grid, level=k)


def level_box(spec: BlockSpec, box: Box, coarse: BlockSpec) -> Box:
    """``box`` of ``spec``'s blocks mapped onto ``coarse`` (a coarser level of it): the coarse blocks
    holding its first and last elements along each coarsened axis; other axes (time) unchanged."""
    factor = 2 ** (coarse.level - spec.level)
    lo, hi = list(box.lo), list(box.hi)
    for a in spec.level_axes:
        b, n, cb = spec.grid.block[a], spec.grid.shape[a], coarse.grid.block[a]
        lo[a] = lo[a] * b // factor // cb
        hi[a] = (min((hi[a] + 1) * b, n) - 1) // factor // cb
    return Box(tuple(lo), tuple(hi))


@dataclass(frozen=True)
class LevelPlan:
    """One coarse level's plan: every owner's share (block, decode into L1 too) for the mapped view."""

    spec: BlockSpec
    box: Box
    shares: dict[str, list[tuple[BlockIndex, bool]]]


@dataclass(frozen=True)
class _Planned:
    box: Box
    reach: int
    workers: tuple[str, ...]


class CoarsePlanner:
    """The coarse levels' plans for one scheduler plugin, and what each session's last ones covered."""

    def __init__(self, max_blocks: int = 1024) -> None:
        self.max_blocks = max_blocks
        self._last: OrderedDict[tuple[str, BlockSpec], _Planned] = OrderedDict()
        self.last = dict.fromkeys(COUNTS, 0)  # what the last ``plan`` did: its host adds it to its totals

    def forget(self, client: str, spec: BlockSpec) -> None:
        """``spec``'s position just got another plan (the user views that level): the next coarse plan
        for it must be sent, not taken as unchanged."""
        self._last.pop((client, spec), None)

    def forget_client(self, client: str) -> None:
        for key in [k for k in self._last if k[0] == client]:
            del self._last[key]

    def plan(
        self,
        client: str,
        spec: BlockSpec,
        view: Box,
        l1: Mapping[str, int],
        l2: Mapping[str, int],
        ratio: float,
        owners: Callable[[BlockSpec, np.ndarray], np.ndarray],
    ) -> list[LevelPlan]:
        """Plans for the levels coarser than ``spec``'s around ``view``, coarsest first; levels whose
        last plan still covers the view are left out.

        ``l1``/``l2``: each worker's tier capacity in bytes; ``ratio``: encoded over decoded block size
        (the workers' measured average); ``owners``: each block of an (n, ndim) array's owner, as its
        position in the sorted workers (``scheduler.Owners.columns``).
        """
        workers = tuple(sorted(l2))
        total1, total2 = sum(l1.values()), sum(l2.values())
        left1, left2, left_blocks = L1_SHARE * total1, L2_SHARE * total2, self.max_blocks
        plans, call = [], dict.fromkeys(COUNTS, 0)
        for k in range(spec.levels - 1, spec.level, -1):
            last = k == spec.level + 1
            coarse = level_spec(spec, k)
            box = level_box(spec, view, coarse)
            decoded = entry_charge(coarse.block_nbytes, "distance")
            encoded = max(ratio * decoded, 1.0)
            share1, share2 = (left1, left2) if last else (left1 / 2, left2 / 2)
            if coarse.coarsest:  # decoded within a share of its own, not of left1
                share1 = COARSEST_L1_SHARE * total1
            limit = min(math.prod(coarse.grid.nblocks), left_blocks if last else left_blocks // 2,
                        int(share2 // encoded))
            if not coarse.coarsest:
                left1 -= min(limit, int(share1 // decoded)) * decoded
            left2 -= limit * encoded
            left_blocks -= limit
            key = (client, coarse)
            if limit <= 0:
                continue
            if self._covers(self._last.get(key), box, workers, coarse.time_axis):
                call["unchanged"] += 1
                continue
            # Nearest first up to the limit (a ball clipped by the grid's edge leaves room farther out).
            blocks = around(coarse.grid, box, sum(coarse.grid.nblocks), limit, coarse.time_axis)
            call["enumerated"] += len(blocks)
            shares, dropped = _assign(coarse, blocks, owners, workers, _split(share1, l1, total1, decoded),
                                      _split(share2, l2, total2, encoded))
            # Every block nearer than this is planned: the last one enumerated, or the first left out.
            reach = box.distance(tuple(blocks[-1].tolist()) if dropped is None else dropped, coarse.time_axis)
            plans.append(LevelPlan(coarse, box, shares))
            self._remember(key, _Planned(box, reach, workers))
            call["plans"] += 1
            call["planned"] += sum(len(s) for s in shares.values())
        call["max_enumerated"] = call["enumerated"]
        self.last = call
        return plans

    def _covers(self, planned: _Planned | None, box: Box, workers: tuple[str, ...], t: int | None) -> bool:
        """Whether the last plan for this level still serves ``box``: the same workers and spatial blocks,
        the time moved by at most a quarter of the plan's reach (it planned every block within ``reach -
        1`` hops of its box, so 3/4 of that around the new box is still planned)."""
        if planned is None or planned.workers != workers:
            return False
        old = planned.box
        for a, (lo, hi, olo, ohi) in enumerate(zip(box.lo, box.hi, old.lo, old.hi, strict=True)):
            moved = max(abs(lo - olo), abs(hi - ohi))
            if moved > (planned.reach // 4 if a == t else 0):
                return False
        return True

    def _remember(self, key: tuple[str, BlockSpec], planned: _Planned) -> None:
        self._last[key] = planned
        self._last.move_to_end(key)
        while len(self._last) > MAX_REMEMBERED:
            self._last.popitem(last=False)


def add_counts(into: dict[str, int], call: Mapping[str, int]) -> None:
    """Add one ``plan`` call's counts to running totals: sums, and the most blocks enumerated in one view."""
    for k in COUNTS[:-1]:
        into[k] += call[k]
    into["max_enumerated"] = max(into["max_enumerated"], call["enumerated"])


def _split(share: float, capacity: Mapping[str, int], total: int, nbytes: float) -> dict[str, int]:
    """Blocks of ``nbytes`` each worker may take of a level's ``share`` bytes: its part by capacity."""
    if total <= 0:
        return dict.fromkeys(capacity, 0)
    return {w: int(share * c / total // nbytes) for w, c in capacity.items()}


def _assign(
    spec: BlockSpec,
    blocks: np.ndarray,
    owners: Callable[[BlockSpec, np.ndarray], np.ndarray],
    workers: Sequence[str],
    fits1: Mapping[str, int],
    fits2: Mapping[str, int],
) -> tuple[dict[str, list[tuple[BlockIndex, bool]]], BlockIndex | None]:
    """Each block to its owner while the owner's L2 part has room, the nearest decoded while its L1 part
    has room (a decoded prefetch fills L2 too); and the first block left out (None: none was)."""
    who = owners(spec, blocks)
    shares: dict[str, list[tuple[BlockIndex, bool]]] = {}
    dropped = len(blocks)
    for i, w in enumerate(workers):
        mine = who == i
        rank = np.cumsum(mine) - 1
        over = np.flatnonzero(mine & (rank >= fits2[w]))
        dropped = min(dropped, int(over[0])) if len(over) else dropped
        rows = np.flatnonzero(mine & (rank < fits2[w]))
        shares[w] = list(zip(map(tuple, blocks[rows].tolist()), (rank[rows] < fits1[w]).tolist()))
    return shares, (None if dropped == len(blocks) else tuple(blocks[dropped].tolist()))
