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

import functools
import itertools
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from tierscope.grid import BlockGrid, BlockIndex

__all__ = ["MODES", "PREDICTORS", "Box", "Position", "around", "check_mode", "radius_for"]

PREDICTORS = ("neighbourhood", "momentum", "playback")
MODES = ("off", *PREDICTORS, "auto")
# How a predictor is scored: the share of the next view's blocks among its first
# SCORE_BUDGET x (view size) candidates, so a predictor is not rewarded for guessing everything.
SCORE_BUDGET = 2
# Views of more blocks score on this many: scoring stays bounded however big a view is.
SCORE_VIEW_CAP = 64


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
        """``distance`` for an (n, ndim) array of block indices at once (in place over whole rows of its
        transpose: one pass over 10^5 cached blocks costs about a millisecond)."""
        columns = np.asarray(indices).T
        steps = np.asarray(self.lo, dtype=columns.dtype)[:, None] - columns
        np.maximum(steps, columns - np.asarray(self.hi, dtype=columns.dtype)[:, None], out=steps)
        np.maximum(steps, 0, out=steps)
        if time_axis is None:
            return steps.max(axis=0, initial=0)
        dt = steps[time_axis].copy()
        steps[time_axis] = 0
        return steps.max(axis=0, initial=0) + dt

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

    The ball grows with r, so the radius is bisected over 0..(the radius that covers the whole grid):
    about log2 of the grid's extent in steps, each one vectorised ball count, whatever the dataset's size.
    """
    if block_nbytes <= 0 or capacity <= 0:
        return 0
    extents = tuple(int(e) for e in view) if view is not None else (1,) * grid.ndim
    # Blocks that fit (ball counts are whole), rounded down to 10 significant bits: a measured average
    # size changes a little with every block and the radius it gives almost never does, so most calls
    # are cache hits.
    fits = int(capacity // block_nbytes)
    drop = max(fits.bit_length() - 10, 0)
    return _radius(grid.nblocks, extents, time_axis, fits >> drop << drop)


@functools.lru_cache(maxsize=4096)
def _radius(nblocks: tuple[int, ...], extents: tuple[int, ...], time_axis: int | None, fits: int) -> int:
    grid = BlockGrid(nblocks, (1,) * len(nblocks))
    lo, hi = 0, max(1, sum(nblocks))  # ball(lo) fits (or lo == 0); beyond hi nothing changes
    if _ball_count(grid, extents, hi, time_axis) <= fits:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _ball_count(grid, extents, mid, time_axis) <= fits:
            lo = mid
        else:
            hi = mid
    return lo


def _ball_count(grid: BlockGrid, extents: Sequence[int], r: int, time_axis: int | None) -> float:
    """Blocks within ``r`` hops of a box with ``extents`` (clipped to the grid's size per axis).

    A ball is the view's time steps with the spatial box grown by r, plus, s steps before and after,
    the spatial box grown by r - s. Only the steps where the time span still grows matter, so this is
    one NumPy expression over at most min(r, time blocks) steps (floats: no overflow on huge grids).
    """
    nblocks = np.asarray(grid.nblocks, dtype=np.float64)
    ext = np.minimum(np.asarray(extents, dtype=np.float64), nblocks)
    spatial = [a for a in range(grid.ndim) if a != time_axis]

    def box_count(q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64)[..., None]
        return np.prod(np.minimum(ext[spatial] + 2 * q, nblocks[spatial]), axis=-1)

    if time_axis is None:
        return float(box_count(np.float64(r)))
    nt, et = nblocks[time_axis], ext[time_axis]
    # the time span grows (by 2, then by 1 at one edge) only while et + 2s < nt + 1
    steps = np.arange(1, min(r, int(np.ceil((nt - et) / 2)) + 1) + 1, dtype=np.float64)
    steps = steps[steps <= r]
    grown = np.minimum(et + 2 * steps, nt) - np.minimum(et + 2 * (steps - 1), nt)
    return float(et * box_count(np.float64(r)) + np.sum(grown * box_count(r - steps)))


class Position:
    """One session's place in one variable's block space: the current view box, its history, and plans.

    A view is kept as its box of blocks, so observing, scoring and planning cost the same whatever the
    dataset's size and however many blocks a view lists: only a plan's own blocks are ever enumerated.
    """

    def __init__(self, grid: BlockGrid, time_axis: int | None = 0, history: int = 16) -> None:
        if time_axis is not None and not 0 <= time_axis < grid.ndim:
            raise ValueError(f"time axis {time_axis} is not an axis of a {grid.ndim}-d grid")
        self.grid = grid
        self.time_axis = time_axis
        self._boxes: deque[Box] = deque(maxlen=2)
        self._scores: dict[str, deque[float]] = {p: deque(maxlen=history) for p in PREDICTORS}
        self.views = 0

    @property
    def box(self) -> Box | None:
        """The current view's box (None before the first view)."""
        return self._boxes[-1] if self._boxes else None

    @property
    def velocity(self) -> tuple[int, ...]:
        """The last step between two views (zero before the second view)."""
        if len(self._boxes) < 2:
            return (0,) * self.grid.ndim
        prev, cur = self._boxes
        return tuple(c - p for c, p in zip(cur.lo, prev.lo, strict=True))

    def observe(self, blocks: Iterable[Sequence[int]]) -> bool:
        """Record a view's blocks (their box); True when it differs from the current view."""
        return self.observe_box(Box.of(self.grid.check(b) for b in blocks))

    def observe_box(self, box: Box, score: bool = True) -> bool:
        """Record a view given as its box; True when it differs from the current view (a new position).

        ``score=False`` skips scoring the predictors on it: only ``auto`` plans use the scores.
        """
        self.grid.check(box.lo)
        self.grid.check(box.hi)
        if any(lo > hi for lo, hi in zip(box.lo, box.hi, strict=True)):
            raise ValueError(f"a view box needs lo <= hi on every axis, got {box.lo} .. {box.hi}")
        if box == self.box:
            return False
        if self._boxes and score:
            self._score(box)
        self._boxes.append(box)
        self.views += 1
        return True

    def distance(self, index: Sequence[int]) -> int:
        """Hops from ``index`` to the current view (0 inside it; 0 before any view)."""
        box = self.box
        return 0 if box is None else box.distance(index, self.time_axis)

    def within(self, blocks: Sequence[Sequence[int]], radius: int) -> list[bool]:
        """For each block, whether it lies within ``radius`` hops of the current view (one NumPy pass)."""
        indices = np.array(blocks, dtype=np.int64).reshape(-1, self.grid.ndim)
        return (self.box.distances(indices, self.time_axis) <= radius).tolist()

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
        chunks = itertools.chain(self._candidates(predictor, radius), self._neighbourhood(radius))
        return [tuple(i) for i in _first_unique(chunks, self.grid, limit).tolist()]

    def _candidates(self, predictor: str, radius: int) -> Iterator[np.ndarray]:
        """A predictor's guesses outside the current view, within ``radius``, most likely first, as
        (n, ndim) chunks of block indices."""
        if predictor == "neighbourhood":
            return self._neighbourhood(radius)
        if predictor == "momentum":
            return self._along(self.velocity, radius)
        step = [0] * self.grid.ndim
        if self.time_axis is not None:
            step[self.time_axis] = 1
        return self._along(tuple(step), radius)

    def _neighbourhood(self, radius: int) -> Iterator[np.ndarray]:
        """Shell by shell, nearest first; in a shell, time step by time step, each step's spatial ring
        in C order (vectorised). Work is proportional to the blocks yielded, not to the grid: time steps
        whose ring would lie wholly outside the grid are skipped (a view spanning a coarse level's few
        spatial blocks leaves two steps per shell), and shells stop where the grid ends."""
        box, t, nblocks = self.box, self.time_axis, self.grid.nblocks
        spatial = [a for a in range(self.grid.ndim) if a != t]
        # Rings of more hops than this are empty: no spatial axis has room for them.
        reach = max((max(box.lo[a], nblocks[a] - 1 - box.hi[a]) for a in spatial), default=0)
        rings: dict[int, np.ndarray] = {}  # spatial ring by hops: the same at every time step

        def at(q: int, step: int | None) -> np.ndarray:
            ring = rings.get(q)
            if ring is None:
                ring = rings[q] = _ring(box, nblocks, spatial, q)
            if step is None:
                return ring
            out = np.empty((len(ring), self.grid.ndim), dtype=np.int64)
            out[:, spatial] = ring
            out[:, t] = step
            return out

        if t is None:
            for d in range(1, min(radius, reach) + 1):
                yield at(d, None)
            return
        lo, hi, nt = box.lo[t], box.hi[t], nblocks[t]
        for d in range(1, min(radius, reach + max(lo, nt - 1 - hi)) + 1):
            near = max(d - reach, 1)  # steps nearer in time than this would need a ring beyond ``reach``
            steps = itertools.chain(range(max(lo - d, 0), lo - near + 1),
                                    range(lo, hi + 1) if d <= reach else (),
                                    range(hi + near, min(hi + d + 1, nt)))
            for step in steps:
                yield at(d - max(lo - step, 0, step - hi), step)

    def _along(self, step: tuple[int, ...], radius: int) -> Iterator[np.ndarray]:
        """The view repeated at ``step``, ``2 * step``, ... while any of it lies within ``radius``."""
        if not any(step):
            return
        box = self.box
        for k in itertools.count(1):
            indices = _box_indices(box.shifted(tuple(k * s for s in step)), self.grid)
            if indices is None:
                return
            hops = box.distances(indices, self.time_axis)
            if hops.min() > radius:
                return
            yield indices[(hops > 0) & (hops <= radius)]

    def _score(self, new: Box) -> None:
        """Before moving on: how much of the ``new`` view each predictor would have fetched from here.

        Each predictor gets a budget of ``SCORE_BUDGET`` x (the new view's blocks, at most
        ``SCORE_VIEW_CAP``) guesses, and scores the share of the new view's unseen blocks it guessed.
        """
        old = self.box
        wanted = _count(new) - _count(_overlap(new, old))
        if not wanted:
            return
        budget = SCORE_BUDGET * min(_count(new), SCORE_VIEW_CAP)
        corners = itertools.product(*zip(new.lo, new.hi, strict=True))
        radius = max(old.distance(c, self.time_axis) for c in corners)
        for p in PREDICTORS:
            guessed = _first_unique(self._candidates(p, radius), self.grid, budget)
            hit = (new.distances(guessed, None) == 0) & (old.distances(guessed, None) > 0)
            self._scores[p].append(int(hit.sum()) / min(wanted, budget))


def around(grid: BlockGrid, box: Box, radius: int, limit: int, time_axis: int | None = 0) -> np.ndarray:
    """The blocks of ``box``, then those within ``radius`` hops of it, nearest first (in a shell, time
    step by time step, each step's ring in C order), as an (n, ndim) array of at most ``limit`` rows.

    Unlike ``Position.plan`` the box itself comes first: a coarse level's plan wants the blocks under the
    view (the user loaded another level's there). Vectorised, and nothing beyond the ``limit`` nearest
    is enumerated but the last shell's rings: how many blocks each shell holds is a convolution of the
    spatial rings' sizes with the time steps at each time distance, so the shell where the limit falls
    is known before any block is listed.
    """
    t = time_axis
    spatial = [a for a in range(grid.ndim) if a != t]
    nblocks = np.asarray(grid.nblocks, dtype=np.int64)
    lo, hi = np.asarray(box.lo, dtype=np.int64), np.asarray(box.hi, dtype=np.int64)
    if limit <= 0:
        return np.empty((0, grid.ndim), dtype=np.int64)
    # Blocks per spatial ring q (0: the box's own), up to the farthest that still holds any.
    reach = int(np.max(np.maximum(lo[spatial], nblocks[spatial] - 1 - hi[spatial]), initial=0))
    q = np.arange(min(reach, radius, limit) + 1)
    grown = np.prod(np.minimum(hi[spatial] + q[:, None], nblocks[spatial] - 1)
                    - np.maximum(lo[spatial] - q[:, None], 0) + 1, axis=1)
    rings = np.diff(grown, prepend=0)
    # Time steps per time distance: the box's own, then one before and one after while the grid lasts.
    if t is None:
        steps = np.ones(1, dtype=np.int64)
    else:
        dt = np.arange(1, min(max(lo[t], nblocks[t] - 1 - hi[t]), radius, limit) + 1)
        sides = (lo[t] - dt >= 0).astype(np.int64) + (hi[t] + dt < nblocks[t])
        steps = np.concatenate([[hi[t] - lo[t] + 1], sides])
    shells = np.convolve(rings, steps)[: radius + 1]  # blocks at each distance
    last = int(min(np.searchsorted(np.cumsum(shells), limit), len(shells) - 1))
    # Every (time distance, ring) pair of the shells up to ``last``, as (distance, time step, ring) rows.
    dts, qs = (a.ravel() for a in np.meshgrid(np.arange(min(len(steps) - 1, last) + 1),
                                             np.arange(min(len(rings) - 1, last) + 1), indexing="ij"))
    keep = dts + qs <= last
    dts, qs = dts[keep], qs[keep]
    if t is None:
        pairs = np.stack([qs, np.zeros_like(qs), qs], axis=1)
    else:  # the box's own steps (each of them), the one before, the one after
        extent = hi[t] - lo[t] + 1
        own = np.repeat(np.flatnonzero(dts == 0), extent)
        own_steps = lo[t] + np.tile(np.arange(extent), int(np.sum(dts == 0)))
        before = (dts > 0) & (lo[t] - dts >= 0)
        after = (dts > 0) & (hi[t] + dts < nblocks[t])
        pairs = np.concatenate([
            np.stack([qs[own], own_steps, qs[own]], axis=1),
            np.stack([dts[before] + qs[before], lo[t] - dts[before], qs[before]], axis=1),
            np.stack([dts[after] + qs[after], hi[t] + dts[after], qs[after]], axis=1),
        ])
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    counts = rings[pairs[:, 2]]
    starts = np.cumsum(counts) - counts
    needed = starts < limit  # a prefix: the pairs the limit reaches
    pairs, counts, starts = pairs[needed], counts[needed], starts[needed]
    # The rings themselves, in one pass: the spatial box grown to the farthest ring used, by hops, stably
    # (C order within a ring), then each pair's ring copied out at its time step.
    table = _rings(lo[spatial], hi[spatial], nblocks[spatial], int(pairs[:, 2].max(initial=0)))
    offsets = np.cumsum(rings) - rings
    rows = np.repeat(offsets[pairs[:, 2]] - starts, counts) + np.arange(int(counts.sum()))
    out = np.empty((len(rows), grid.ndim), dtype=np.int64)
    out[:, spatial] = table[rows]
    if t is not None:
        out[:, t] = np.repeat(pairs[:, 1], counts)
    return out[:limit]


def _rings(lo: np.ndarray, hi: np.ndarray, nblocks: np.ndarray, q: int) -> np.ndarray:
    """The spatial indices within ``q`` hops (Chebyshev) of the box ``lo..hi``, clipped to the grid,
    ring by ring (C order within each), as an (n, len(lo)) array."""
    grown = _box_grid([max(0, a - q) for a in lo],
                      [min(n - 1, b + q) for b, n in zip(hi, nblocks, strict=True)])
    hops = np.maximum(np.maximum(lo - grown, 0), grown - hi).max(axis=1, initial=0)
    return grown[np.argsort(hops, kind="stable")]


def _first_unique(chunks: Iterable[np.ndarray], grid: BlockGrid, limit: int | None) -> np.ndarray:
    """The first ``limit`` distinct block indices of a stream of (n, ndim) chunks, in stream order.

    Chunks are deduplicated in batches of about twice what is still wanted: a few NumPy passes per plan,
    however small the shells and rings that make the chunks."""
    taken: list[np.ndarray] = []
    seen = np.empty(0, dtype=np.int64)
    count, stream = 0, iter(chunks)
    while limit is None or count < limit:
        batch, size = [], 0
        for chunk in stream:
            batch.append(chunk)
            size += len(chunk)
            if limit is not None and size >= 2 * (limit - count):
                break
        if not batch:
            break
        rows = np.concatenate(batch)
        flat = np.ravel_multi_index(rows.T, grid.nblocks)
        _, first = np.unique(flat, return_index=True)
        first.sort()
        first = first[~np.isin(flat[first], seen)]
        if limit is not None:
            first = first[: limit - count]
        taken.append(rows[first])
        seen = np.concatenate([seen, flat[first]])
        count += len(first)
    return np.concatenate(taken) if taken else np.empty((0, grid.ndim), dtype=np.int64)


def _count(box: Box | None) -> int:
    return 0 if box is None else math.prod(box.extents)


def _overlap(a: Box, b: Box) -> Box | None:
    lo = tuple(map(max, a.lo, b.lo))
    hi = tuple(map(min, a.hi, b.hi))
    return Box(lo, hi) if all(x <= y for x, y in zip(lo, hi, strict=True)) else None


def _box_indices(box: Box, grid: BlockGrid) -> np.ndarray | None:
    """The (n, ndim) indices of ``box`` clipped to the grid, in C order; None when none is inside."""
    lo = [max(0, a) for a in box.lo]
    hi = [min(n - 1, b) for b, n in zip(box.hi, grid.nblocks, strict=True)]
    if any(a > b for a, b in zip(lo, hi, strict=True)):
        return None
    return _box_grid(lo, hi)


def _ring(box: Box, nblocks: Sequence[int], spatial: Sequence[int], q: int) -> np.ndarray:
    """The ``spatial`` axes' indices exactly ``q`` hops (Chebyshev) from the box's spatial part, clipped
    to the grid, in C order, as an (n, len(spatial)) array."""
    grown = _box_grid([max(0, box.lo[a] - q) for a in spatial],
                      [min(nblocks[a] - 1, box.hi[a] + q) for a in spatial])
    lo, hi = np.asarray([box.lo[a] for a in spatial]), np.asarray([box.hi[a] for a in spatial])
    hops = np.maximum(np.maximum(lo - grown, 0), grown - hi).max(axis=1, initial=0)
    return grown[hops == q]


def _box_grid(lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    """Every index of the box ``lo..hi`` (inclusive, non-empty), in C order, as an (n, len(lo)) int64
    array: ``np.indices`` plus the corner, ~3x faster than stacking a meshgrid for the small boxes plans
    and scores list many of."""
    shape = tuple(b - a + 1 for a, b in zip(lo, hi, strict=True))
    indices = np.indices(shape, dtype=np.int64).reshape(len(shape), math.prod(shape)).T
    return indices + np.asarray(lo, dtype=np.int64)
