"""Where a session is in block space, where it goes next, and which blocks to load before it asks.

One module, two hosts: the Dask scheduler plugin (filling worker L1/L2) and the block server (filling
L3/L4) each keep one ``Position`` per (session, dataset, variable, tol), feed it every view's blocks and ask
it for a plan. A view is a box of blocks (a basic xarray selection always is one); distances are the
brief's hops from that box: ``|dt| + max(|dz|, |dy|, |dx|)``, counted outside the box.

Predictors, each an ordered list of candidate blocks:
- neighbourhood: shells around the view, nearest first;
- momentum: the view moved by the same step again (and again), within the radius;
- playback: the same view at t+1, t+2, ...;
- auto: the predictor whose recent guesses held most of the next view's blocks, then the neighbourhood.
Every plan stays within the radius that fits the tier being filled (``radius_for``), so a distance-ordered
eviction never throws out what was just prefetched.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from tierscope.grid import BlockGrid, BlockIndex

__all__ = ["MODES", "PREDICTORS", "Box", "Position", "check_mode", "radius_for"]

PREDICTORS = ("neighbourhood", "momentum", "playback")
MODES = ("off", *PREDICTORS, "auto")
# How a predictor is scored: the share of the next view's blocks among its first
# SCORE_BUDGET x (view size) candidates, so a predictor is not rewarded for guessing everything.
SCORE_BUDGET = 2


def check_mode(mode: str) -> str:
    """Validate a prefetch mode name."""
    if mode not in MODES:
        raise ValueError(f"prefetch mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box of block indices, bounds inclusive."""

    lo: BlockIndex
    hi: BlockIndex

    @classmethod
    def of(cls, blocks: Iterable[Sequence[int]]) -> Box:
        blocks = [tuple(int(i) for i in b) for b in blocks]
        if not blocks:
            raise ValueError("a view needs at least one block")
        return cls(tuple(map(min, zip(*blocks, strict=True))), tuple(map(max, zip(*blocks, strict=True))))

    @property
    def extents(self) -> tuple[int, ...]:
        return tuple(h - lo + 1 for lo, h in zip(self.lo, self.hi, strict=True))

    def distance(self, index: Sequence[int], time_axis: int | None = 0) -> int:
        """Hops from ``index`` to the nearest block of the box (0 inside it)."""
        steps = [max(lo - i, 0, i - hi) for i, lo, hi in zip(index, self.lo, self.hi, strict=True)]
        dt = steps.pop(time_axis) if time_axis is not None else 0
        return dt + max(steps, default=0)

    def distances(self, indices: np.ndarray, time_axis: int | None = 0) -> np.ndarray:
        """``distance`` for an (n, ndim) array of block indices at once."""
        steps = np.maximum(np.maximum(np.asarray(self.lo) - indices, 0), indices - np.asarray(self.hi))
        if time_axis is None:
            return steps.max(axis=1, initial=0)
        spatial = np.delete(steps, time_axis, axis=1)
        return steps[:, time_axis] + spatial.max(axis=1, initial=0)

    def shifted(self, step: Sequence[int]) -> Box:
        return Box(
            tuple(a + s for a, s in zip(self.lo, step, strict=True)),
            tuple(a + s for a, s in zip(self.hi, step, strict=True)),
        )

    def blocks(self, grid: BlockGrid, grow: int = 0) -> Iterator[BlockIndex]:
        """The box's blocks (grown by ``grow`` on every axis) that lie inside the grid, in C order."""
        ranges = [
            range(max(0, lo - grow), min(n, hi + grow + 1))
            for lo, hi, n in zip(self.lo, self.hi, grid.nblocks, strict=True)
        ]
        return itertools.product(*ranges)


def radius_for(
    grid: BlockGrid,
    capacity: int,
    block_nbytes: float,
    time_axis: int | None = 0,
    view: Sequence[int] | None = None,
) -> int:
    """The largest hop radius whose ball of blocks around a view fits ``capacity`` bytes.

    ``block_nbytes`` is the tier's measured average block size (decoded for L1/L4, encoded for L2/L3);
    ``view`` the extents in blocks of a typical view (one block by default). The time axis counts like
    any other: a ball of radius r holds t-r..t+r, each with a spatial box shrunk by the time steps spent.
    0 means only the view itself fits (nothing to prefetch).
    """
    if block_nbytes <= 0 or capacity <= 0:
        return 0
    extents = tuple(view) if view is not None else (1,) * grid.ndim
    max_r = sum(grid.nblocks)  # beyond this the ball is the whole grid
    best = 0
    for r in range(1, max_r + 1):
        if _ball_count(grid, extents, r, time_axis) * block_nbytes > capacity:
            break
        best = r
    return best


def _ball_count(grid: BlockGrid, extents: Sequence[int], r: int, time_axis: int | None) -> int:
    """Blocks within ``r`` hops of a box with ``extents`` (clipped to the grid's size per axis)."""

    def span(axis: int, q: int) -> int:
        return min(extents[axis] + 2 * q, grid.nblocks[axis])

    spatial = [a for a in range(grid.ndim) if a != time_axis]

    def box_count(q: int) -> int:
        count = 1
        for a in spatial:
            count *= span(a, q)
        return count

    if time_axis is None:
        return box_count(r)
    total = span(time_axis, 0) * box_count(r)
    for s in range(1, r + 1):
        total += (span(time_axis, s) - span(time_axis, s - 1)) * box_count(r - s)
    return total


class Position:
    """One session's place in one variable's block space: the current view, its history, and plans."""

    def __init__(self, grid: BlockGrid, time_axis: int | None = 0, history: int = 16) -> None:
        if time_axis is not None and not 0 <= time_axis < grid.ndim:
            raise ValueError(f"time axis {time_axis} is not an axis of a {grid.ndim}-d grid")
        self.grid = grid
        self.time_axis = time_axis
        self.current: tuple[BlockIndex, ...] = ()
        self._boxes: deque[Box] = deque(maxlen=2)
        self._scores: dict[str, deque[float]] = {p: deque(maxlen=history) for p in PREDICTORS}
        self.views = 0

    @property
    def box(self) -> Box | None:
        return self._boxes[-1] if self._boxes else None

    @property
    def velocity(self) -> tuple[int, ...]:
        """The last step between two views (zero before the second view)."""
        if len(self._boxes) < 2:
            return (0,) * self.grid.ndim
        prev, cur = self._boxes
        return tuple(c - p for c, p in zip(cur.lo, prev.lo, strict=True))

    def observe(self, blocks: Iterable[Sequence[int]]) -> bool:
        """Record a view's blocks; True when it differs from the current view (a new position)."""
        view = tuple(sorted({self.grid.check(b) for b in blocks}))
        if not view:
            raise ValueError("a view needs at least one block")
        if view == self.current:
            return False
        if self.current:
            self._score(view)
        self.current = view
        self._boxes.append(Box.of(view))
        self.views += 1
        return True

    def distance(self, index: Sequence[int]) -> int:
        """Hops from ``index`` to the current view (0 inside it; 0 before any view)."""
        box = self.box
        return 0 if box is None else box.distance(index, self.time_axis)

    def scores(self) -> dict[str, float]:
        """Recent accuracy of each predictor, 0..1 (0 before it has been scored)."""
        return {p: (sum(s) / len(s) if s else 0.0) for p, s in self._scores.items()}

    def chosen(self) -> str:
        """The predictor ``auto`` follows now: the best recent score; neighbourhood until one is better."""
        scores = self.scores()
        best = max(PREDICTORS, key=lambda p: (scores[p], p == "neighbourhood"))
        return best if scores[best] > 0 else "neighbourhood"

    def plan(self, mode: str, radius: int, limit: int | None = None) -> list[BlockIndex]:
        """Blocks to prefetch, most likely first: outside the current view, within ``radius`` hops."""
        check_mode(mode)
        if mode == "off" or self.box is None or radius <= 0 or limit == 0:
            return []
        predictor = self.chosen() if mode == "auto" else mode
        candidates = itertools.chain(self._candidates(predictor, radius), self._neighbourhood(radius))
        plan, seen = [], set(self.current)
        for index in candidates:
            if index in seen:
                continue
            seen.add(index)
            plan.append(index)
            if limit is not None and len(plan) >= limit:
                break
        return plan

    def _candidates(self, predictor: str, radius: int) -> Iterator[BlockIndex]:
        if predictor == "neighbourhood":
            return self._neighbourhood(radius)
        if predictor == "momentum":
            return self._along(self.velocity, radius)
        step = [0] * self.grid.ndim
        if self.time_axis is not None:
            step[self.time_axis] = 1
        return self._along(tuple(step), radius)

    def _neighbourhood(self, radius: int) -> Iterator[BlockIndex]:
        """Shell by shell: the grown box's blocks at exactly ``d`` hops, in C order (vectorised)."""
        box = self.box
        for d in range(1, radius + 1):
            axes = [
                np.arange(max(0, lo - d), min(n, hi + d + 1))
                for lo, hi, n in zip(box.lo, box.hi, self.grid.nblocks, strict=True)
            ]
            grown = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, self.grid.ndim)
            yield from map(tuple, grown[box.distances(grown, self.time_axis) == d].tolist())

    def _along(self, step: tuple[int, ...], radius: int) -> Iterator[BlockIndex]:
        """The view repeated at ``step``, ``2 * step``, ... while any of it lies within ``radius``."""
        if not any(step):
            return
        box = self.box
        for k in itertools.count(1):
            moved = box.shifted(tuple(k * s for s in step))
            inside = [
                i for i in moved.blocks(self.grid) if box.distance(i, self.time_axis) <= radius
            ]
            if not inside:
                return
            yield from inside

    def _score(self, view: tuple[BlockIndex, ...]) -> None:
        """Before moving on: how much of ``view`` each predictor would have fetched from here."""
        budget = SCORE_BUDGET * len(view)
        radius = max(self.box.distance(i, self.time_axis) for i in view)
        wanted = set(view) - set(self.current)
        if not wanted:
            return
        for p in PREDICTORS:
            guessed = {
                i for i in itertools.islice(self._candidates(p, radius), budget) if i not in self.current
            }
            self._scores[p].append(len(wanted & guessed) / len(wanted))
