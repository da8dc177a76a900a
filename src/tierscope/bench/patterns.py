"""Fixed access sequences for the evaluation harness: how a scientist moves through a 4-D dataset.

A ``View`` is one real xarray selection of a (time, z, y, x) variable: one time step, and per spatial
dimension an element index or a half-open element range. Generators turn a block grid and a seed into a
``Sequence`` of views; the same seed and grid always give the same views, and a saved sequence replays
unchanged, so every system in a run sees exactly the same requests.

Patterns (steps are in elements; the defaults move one block so each step can need new blocks):
- ``playback``: the same z-slice at t, t+1, t+2, ... (wrapping at the last time step);
- ``scanning``: sweep z-slices through t (or through z), with probability ``jump`` of a jump elsewhere;
- ``wandering``: a random walk with momentum over t and z, panning a y/x window;
- ``random_jumps``: local steps mixed with jumps anywhere;
- ``zoom_pan``: sub-volumes of one time step that shrink, grow and pan.

Metrics work on the views' block sets: ``recycle_ratio`` (share of block accesses that revisit a block
seen earlier in the sequence), ``max_distance`` (largest hop count from one view's block box to a block of
the next view: the prefetch radius that would have covered every step) and ``access_density`` (distinct
blocks touched / blocks in the grid).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterable, Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierscope.grid import BlockGrid, BlockIndex
from tierscope.prefetch import Box

__all__ = [
    "PATTERNS",
    "Sequence",
    "View",
    "access_density",
    "generate",
    "hops",
    "max_distance",
    "playback",
    "random_jumps",
    "recycle_ratio",
    "scanning",
    "wandering",
    "zoom_pan",
]

FORMAT = "tierscope.sequence"
VERSION = 1
DIMS = ("time", "z", "y", "x")

# One spatial selection: an element index, or a half-open element range (start, stop).
Sel = int | tuple[int, int]


def _sel(value: int | slice | SequenceABC[int], name: str) -> Sel:
    if isinstance(value, slice):
        if value.step not in (None, 1) or value.start is None or value.stop is None:
            raise ValueError(f"view {name}: a slice needs a start and a stop and no step, got {value}")
        value = (value.start, value.stop)
    if isinstance(value, SequenceABC) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"view {name}: a range is [start, stop], got {list(value)}")
        start, stop = (int(v) for v in value)
        if stop <= start:
            raise ValueError(f"view {name}: empty range [{start}, {stop})")
        return (start, stop)
    return int(value)


@dataclass(frozen=True, slots=True)
class View:
    """One selection: time step ``t``; ``z``, ``y``, ``x`` each an element index or a range (start, stop)."""

    t: int
    z: Sel
    y: Sel
    x: Sel

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", int(self.t))
        for name in ("z", "y", "x"):
            object.__setattr__(self, name, _sel(getattr(self, name), name))

    @property
    def sels(self) -> tuple[Sel, Sel, Sel, Sel]:
        return (self.t, self.z, self.y, self.x)

    def check(self, grid: BlockGrid) -> View:
        """Raise ValueError naming the dimension when the view does not lie inside ``grid``."""
        if grid.ndim != 4:
            raise ValueError(f"views select (time, z, y, x); the grid has {grid.ndim} dimensions")
        for name, sel, n in zip(DIMS, self.sels, grid.shape, strict=True):
            start, stop = sel if isinstance(sel, tuple) else (sel, sel + 1)
            if start < 0 or stop > n:
                raise ValueError(f"view {self}: {name} selection {sel} is outside 0..{n - 1}")
        return self

    def isel(self, dims: SequenceABC[str] = DIMS) -> dict[str, int | slice]:
        """The keyword arguments for ``DataArray.isel`` (``dims`` names the dataset's four dimensions)."""
        if len(dims) != 4:
            raise ValueError(f"a view needs four dimension names (time, z, y, x), got {list(dims)}")
        return {
            str(d): slice(*s) if isinstance(s, tuple) else s for d, s in zip(dims, self.sels, strict=True)
        }

    def blocks(self, grid: BlockGrid) -> list[BlockIndex]:
        """The block indices the view touches, in C order."""
        self.check(grid)
        ranges = []
        for sel, b in zip(self.sels, grid.block, strict=True):
            start, stop = sel if isinstance(sel, tuple) else (sel, sel + 1)
            ranges.append(range(start // b, (stop - 1) // b + 1))
        return list(itertools.product(*ranges))

    def to_json(self) -> list[Any]:
        return [list(s) if isinstance(s, tuple) else s for s in self.sels]

    @classmethod
    def from_json(cls, value: Any) -> View:
        if not isinstance(value, list) or len(value) != 4:
            raise ValueError(f"a view is [t, z, y, x], got {value!r}")
        try:
            return cls(*value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad view {value!r}: {e}") from None


# ---- metrics over block sets ------------------------------------------------------------------------


def recycle_ratio(block_sets: Iterable[Iterable[SequenceABC[int]]]) -> float:
    """Share of all block accesses whose block an earlier view already touched (0 for no accesses)."""
    seen: set[BlockIndex] = set()
    total = recycled = 0
    for blocks in block_sets:
        view = {tuple(b) for b in blocks}
        total += len(view)
        recycled += len(view & seen)
        seen |= view
    return recycled / total if total else 0.0


def hops(block_sets: Iterable[Iterable[SequenceABC[int]]]) -> list[int]:
    """Per step: the most hops from the previous view's block box to any block of the next view."""
    out, prev = [], None
    for blocks in block_sets:
        view = [tuple(b) for b in blocks]
        if prev is not None:
            out.append(max(prev.distance(b) for b in view))
        prev = Box.of(view)
    return out


def max_distance(block_sets: Iterable[Iterable[SequenceABC[int]]]) -> int:
    """The largest step in hops between consecutive views (0 for fewer than two views)."""
    return max(hops(block_sets), default=0)


def access_density(block_sets: Iterable[Iterable[SequenceABC[int]]], grid: BlockGrid) -> float:
    """Distinct blocks touched / blocks in the grid."""
    distinct = {tuple(b) for blocks in block_sets for b in blocks}
    total = 1
    for n in grid.nblocks:
        total *= n
    return len(distinct) / total if total else 0.0


# ---- sequences ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sequence:
    """A named, reproducible list of views over one dataset geometry, saved as JSON and replayed as is."""

    name: str
    pattern: str
    seed: int
    shape: tuple[int, ...]
    block: tuple[int, ...]
    views: tuple[View, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "block", tuple(int(b) for b in self.block))
        object.__setattr__(self, "views", tuple(self.views))
        grid = self.grid
        for i, view in enumerate(self.views):
            try:
                view.check(grid)
            except ValueError as e:
                raise ValueError(f"sequence {self.name!r}, view {i}: {e}") from None

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid(self.shape, self.block)

    def block_sets(self) -> list[list[BlockIndex]]:
        grid = self.grid
        return [v.blocks(grid) for v in self.views]

    def metrics(self) -> dict[str, float]:
        """recycle_ratio, max_distance and access_density of this sequence."""
        sets = self.block_sets()
        return {
            "recycle_ratio": recycle_ratio(sets),
            "max_distance": max_distance(sets),
            "access_density": access_density(sets, self.grid),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "seed": self.seed,
            "shape": list(self.shape),
            "block": list(self.block),
            "params": self.params,
            "views": [v.to_json() for v in self.views],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sequence:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a tierscope sequence (expected \"format\": {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"sequence format version {data.get('version')!r} is not supported ({VERSION})")
        missing = [k for k in ("name", "pattern", "seed", "shape", "block", "views") if k not in data]
        if missing:
            raise ValueError(f"sequence is missing {', '.join(missing)}")
        return cls(
            name=str(data["name"]),
            pattern=str(data["pattern"]),
            seed=int(data["seed"]),
            shape=tuple(data["shape"]),
            block=tuple(data["block"]),
            views=tuple(View.from_json(v) for v in data["views"]),
            params=dict(data.get("params", {})),
        )

    def save(self, path: str | Path) -> Path:
        """Write the sequence as JSON (one view per line, so diffs stay readable)."""
        path = Path(path)
        data = self.to_dict()
        views = data.pop("views")
        head = json.dumps(data)[:-1]
        body = ",\n".join("  " + json.dumps(v) for v in views)
        path.write_text(f'{head}, "views": [\n{body}\n]}}\n')
        return path

    @classmethod
    def load(cls, path: str | Path) -> Sequence:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


# ---- generators -----------------------------------------------------------------------------------------


def _check_grid(grid: BlockGrid) -> None:
    if grid.ndim != 4 or 0 in grid.shape:
        raise ValueError(f"access patterns need a non-empty (time, z, y, x) grid, got shape {grid.shape}")


def _check_count(n: int) -> None:
    if n < 1:
        raise ValueError(f"a sequence needs at least one view, got {n}")


def _check_probability(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} is a probability in [0, 1], got {p}")
    return float(p)


def _check_step(name: str, step: int | None, default: int) -> int:
    step = default if step is None else int(step)
    if step < 1:
        raise ValueError(f"{name} must be at least 1 element, got {step}")
    return step


def _window(grid: BlockGrid, window: SequenceABC[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    wy, wx = default if window is None else (int(w) for w in window)
    ny, nx = grid.shape[2:]
    if not (1 <= wy <= ny and 1 <= wx <= nx):
        raise ValueError(f"window {(wy, wx)} must fit the y/x plane {(ny, nx)}")
    return wy, wx


def _half_plane(grid: BlockGrid) -> tuple[int, int]:
    """Default window for panning patterns: half the plane, at least one block."""
    return tuple(min(n, max(b, n // 2)) for n, b in zip(grid.shape[2:], grid.block[2:], strict=True))


def _rng(pattern: str, seed: int) -> random.Random:
    """The pattern's own random stream: the same seed drives different patterns independently."""
    return random.Random(f"{pattern}:{int(seed)}")


def _sequence(pattern: str, grid: BlockGrid, seed: int, views: list[View],
              params: dict[str, Any]) -> Sequence:
    return Sequence(name=f"{pattern}-{seed}", pattern=pattern, seed=seed, shape=grid.shape, block=grid.block,
                    views=tuple(views), params=params)


class _Walker:
    """A z-slice of one time step with a y/x window: position (t, z, y0, x0) moved in element steps."""

    def __init__(self, grid: BlockGrid, rng: random.Random, window: tuple[int, int],
                 steps: tuple[int, int, int, int]) -> None:
        self.rng, self.window, self.steps = rng, window, steps
        nt, nz, ny, nx = grid.shape
        self.limits = (nt - 1, nz - 1, ny - window[0], nx - window[1])
        self.pos = self.anywhere()

    def anywhere(self) -> list[int]:
        return [self.rng.randint(0, hi) for hi in self.limits]

    def movable(self) -> list[int]:
        return [a for a, hi in enumerate(self.limits) if hi > 0]

    def move(self, axis: int, sign: int) -> int:
        """Step along ``axis``; at an edge turn around. Returns the sign actually taken."""
        hi, step = self.limits[axis], self.steps[axis]
        new = self.pos[axis] + sign * step
        if not 0 <= new <= hi:
            sign = -sign
            new = self.pos[axis] + sign * step
        self.pos[axis] = min(max(new, 0), hi)
        return sign

    def view(self) -> View:
        t, z, y0, x0 = self.pos
        return View(t, z, (y0, y0 + self.window[0]), (x0, x0 + self.window[1]))


def playback(grid: BlockGrid, n: int, seed: int, *, z: int | None = None, t0: int | None = None,
             window: SequenceABC[int] | None = None) -> Sequence:
    """The same z-slice at t0, t0+1, ... (wrapping): a movie played forward. Random z/t0 when not given."""
    _check_grid(grid)
    _check_count(n)
    rng = _rng("playback", seed)
    nt, nz, ny, nx = grid.shape
    wy, wx = _window(grid, window, (ny, nx))
    z = rng.randrange(nz) if z is None else int(z)
    t0 = rng.randrange(nt) if t0 is None else int(t0)
    y0, x0 = rng.randint(0, ny - wy), rng.randint(0, nx - wx)
    views = [View((t0 + i) % nt, z, (y0, y0 + wy), (x0, x0 + wx)) for i in range(n)]
    return _sequence("playback", grid, seed, views, {"z": z, "t0": t0, "window": [wy, wx]})


def scanning(grid: BlockGrid, n: int, seed: int, *, axis: str = "t", step: int | None = None,
             jump: float = 0.05, window: SequenceABC[int] | None = None) -> Sequence:
    """Sweep along ``axis`` ("t" or "z"), turning at the ends; with probability ``jump`` per view the other
    coordinate (z when sweeping t, t when sweeping z) and the window's place jump somewhere random."""
    _check_grid(grid)
    _check_count(n)
    if axis not in ("t", "z"):
        raise ValueError(f"scanning sweeps along 't' or 'z', got {axis!r}")
    jump = _check_probability("jump", jump)
    rng = _rng("scanning", seed)
    sweep = 0 if axis == "t" else 1
    other = 1 - sweep
    step = _check_step("step", step, 1 if axis == "t" else grid.block[1])
    wy, wx = _window(grid, window, tuple(grid.shape[2:]))
    walker = _Walker(grid, rng, (wy, wx), (step, step, 1, 1))
    direction, views = 1, [walker.view()]
    for _ in range(n - 1):
        if rng.random() < jump:
            fresh = walker.anywhere()
            walker.pos[other], walker.pos[2], walker.pos[3] = fresh[other], fresh[2], fresh[3]
        if walker.limits[sweep] > 0:
            direction = walker.move(sweep, direction)
        views.append(walker.view())
    return _sequence("scanning", grid, seed, views,
                     {"axis": axis, "step": step, "jump": jump, "window": [wy, wx]})


def _local_steps(grid: BlockGrid, zstep: int | None, pan: int | None) -> tuple[int, int, int, int]:
    zstep = _check_step("zstep", zstep, grid.block[1])
    pan = _check_step("pan", pan, min(grid.block[2:]))
    return (1, zstep, pan, pan)


def wandering(grid: BlockGrid, n: int, seed: int, *, momentum: float = 0.8, zstep: int | None = None,
              pan: int | None = None, window: SequenceABC[int] | None = None) -> Sequence:
    """A random walk over t and z that pans a y/x window: each view steps along one axis, keeping the last
    direction with probability ``momentum`` (turning at edges), otherwise picking a new axis and sign."""
    _check_grid(grid)
    _check_count(n)
    momentum = _check_probability("momentum", momentum)
    rng = _rng("wandering", seed)
    wy, wx = _window(grid, window, _half_plane(grid))
    steps = _local_steps(grid, zstep, pan)
    walker = _Walker(grid, rng, (wy, wx), steps)
    axes = walker.movable()
    velocity: tuple[int, int] | None = None
    views = [walker.view()]
    for _ in range(n - 1):
        if axes:
            if velocity is None or rng.random() >= momentum:
                velocity = (rng.choice(axes), rng.choice((-1, 1)))
            velocity = (velocity[0], walker.move(*velocity))
        views.append(walker.view())
    params = {"momentum": momentum, "zstep": steps[1], "pan": steps[2], "window": [wy, wx]}
    return _sequence("wandering", grid, seed, views, params)


def random_jumps(grid: BlockGrid, n: int, seed: int, *, jump: float = 0.3, zstep: int | None = None,
                 pan: int | None = None, window: SequenceABC[int] | None = None) -> Sequence:
    """Local steps (one axis, one step, random direction) mixed with, at probability ``jump``, a jump to a
    uniformly random time step, z-slice and window place."""
    _check_grid(grid)
    _check_count(n)
    jump = _check_probability("jump", jump)
    rng = _rng("random_jumps", seed)
    wy, wx = _window(grid, window, _half_plane(grid))
    steps = _local_steps(grid, zstep, pan)
    walker = _Walker(grid, rng, (wy, wx), steps)
    axes = walker.movable()
    views = [walker.view()]
    for _ in range(n - 1):
        if rng.random() < jump:
            walker.pos = walker.anywhere()
        elif axes:
            walker.move(rng.choice(axes), rng.choice((-1, 1)))
        views.append(walker.view())
    params = {"jump": jump, "zstep": steps[1], "pan": steps[2], "window": [wy, wx]}
    return _sequence("random_jumps", grid, seed, views, params)


def jumps(grid: BlockGrid, n: int, seed: int, *, steps: int = 3, window: SequenceABC[int] | None = None
          ) -> Sequence:
    """A jump to a random time step and z-slice (a cold view: nothing near it was viewed), then ``steps``
    views of t+1 there (wrapping), again and again: the views a slider user makes after moving far.
    The jump views' indices are in ``params["jumps"]`` so results can report them apart. The window
    defaults to the whole y/x plane."""
    _check_grid(grid)
    _check_count(n)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    rng = _rng("jumps", seed)
    nt, nz, ny, nx = grid.shape
    wy, wx = _window(grid, window, (ny, nx))
    views, jumped = [], []
    for i in range(n):
        if i % (steps + 1) == 0:
            t, z = rng.randrange(nt), rng.randrange(nz)
            y0, x0 = rng.randint(0, ny - wy), rng.randint(0, nx - wx)
            jumped.append(i)
        else:
            t = (t + 1) % nt
        views.append(View(t, z, (y0, y0 + wy), (x0, x0 + wx)))
    return _sequence("jumps", grid, seed, views, {"steps": steps, "window": [wy, wx], "jumps": jumped})


def zoom_pan(grid: BlockGrid, n: int, seed: int, *, zoom: float = 0.3, t: int | None = None,
             min_extent: SequenceABC[int] | None = None) -> Sequence:
    """Sub-volumes of time step ``t``: with probability ``zoom`` halve or double the extent on every spatial
    axis around the centre (within ``min_extent`` .. the full volume), otherwise pan along one spatial axis
    by half the current extent. Starts at half the volume in a random place."""
    _check_grid(grid)
    _check_count(n)
    zoom = _check_probability("zoom", zoom)
    rng = _rng("zoom_pan", seed)
    full = grid.shape[1:]
    lo_ext = tuple(min(b, s) for b, s in zip(grid.block[1:], full, strict=True)) if min_extent is None \
        else tuple(int(e) for e in min_extent)
    if len(lo_ext) != 3 or not all(1 <= e <= s for e, s in zip(lo_ext, full, strict=True)):
        raise ValueError(f"min_extent {lo_ext} must give (z, y, x) sizes within the volume {full}")
    t = rng.randrange(grid.shape[0]) if t is None else int(t)
    ext = [max(e, s // 2) for e, s in zip(lo_ext, full, strict=True)]
    start = [rng.randint(0, s - e) for s, e in zip(full, ext, strict=True)]

    def view() -> View:
        z, y, x = ((a, a + e) for a, e in zip(start, ext, strict=True))
        return View(t, z, y, x)

    views = [view()]
    for _ in range(n - 1):
        if rng.random() < zoom:
            can_in = any(e > lo for e, lo in zip(ext, lo_ext, strict=True))
            can_out = any(e < s for e, s in zip(ext, full, strict=True))
            grow = rng.random() < 0.5 if can_in and can_out else can_out
            for a in range(3):
                new = min(full[a], ext[a] * 2) if grow else max(lo_ext[a], ext[a] // 2)
                centre = start[a] + ext[a] // 2
                start[a] = min(max(centre - new // 2, 0), full[a] - new)
                ext[a] = new
        else:
            movable = [a for a in range(3) if ext[a] < full[a]]
            if movable:
                a = rng.choice(movable)
                shift = rng.choice((-1, 1)) * max(1, ext[a] // 2)
                if not 0 <= start[a] + shift <= full[a] - ext[a]:
                    shift = -shift
                start[a] = min(max(start[a] + shift, 0), full[a] - ext[a])
        views.append(view())
    return _sequence("zoom_pan", grid, seed, views, {"zoom": zoom, "t": t, "min_extent": list(lo_ext)})


PATTERNS: dict[str, Callable[..., Sequence]] = {
    "playback": playback,
    "scanning": scanning,
    "wandering": wandering,
    "random_jumps": random_jumps,
    "jumps": jumps,
    "zoom_pan": zoom_pan,
}


def generate(pattern: str, grid: BlockGrid, n: int, seed: int, name: str | None = None,
             **params: Any) -> Sequence:
    """A sequence of ``pattern`` by name (the CLI's ``--pattern``), optionally renamed."""
    try:
        make = PATTERNS[pattern]
    except KeyError:
        raise ValueError(f"unknown access pattern {pattern!r}; known: {', '.join(PATTERNS)}") from None
    seq = make(grid, n, seed, **params)
    if name is None:
        return seq
    return Sequence(name=name, pattern=seq.pattern, seed=seq.seed, shape=seq.shape, block=seq.block,
                    views=seq.views, params=seq.params)
