"""Block geometry: which stored block holds which elements, and how far apart blocks are.

A variable of shape ``shape`` is stored in blocks of ``block`` elements (the last block along an axis may
be partial). A block index is a tuple of ints, one per axis. The distance between two blocks is the
brief's *hops*: ``|dt| + max(|dz|, |dy|, |dx|)``, with the time-like axis (if any) counted apart.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tierscope.errors import BlockIndexError

__all__ = ["BlockGrid", "BlockIndex", "distance"]

BlockIndex = tuple[int, ...]


def distance(a: Sequence[int], b: Sequence[int], time_axis: int | None = 0) -> int:
    """Hops between two block indices: time steps plus the Chebyshev distance over the other axes."""
    if len(a) != len(b):
        raise BlockIndexError(f"block indices {tuple(a)} and {tuple(b)} differ in length")
    steps = [abs(int(x) - int(y)) for x, y in zip(a, b, strict=True)]
    dt = steps.pop(time_axis) if time_axis is not None and steps else 0
    return dt + max(steps, default=0)


@dataclass(frozen=True, slots=True)
class BlockGrid:
    """The regular block grid of one variable."""

    shape: tuple[int, ...]
    block: tuple[int, ...]

    def __post_init__(self) -> None:
        shape, block = tuple(int(s) for s in self.shape), tuple(int(b) for b in self.block)
        if len(shape) != len(block):
            raise ValueError(f"block shape {block} does not match array shape {shape}")
        if any(s < 0 for s in shape) or any(b <= 0 for b in block):
            raise ValueError(f"invalid grid: shape {shape}, block {block}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "block", block)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nblocks(self) -> tuple[int, ...]:
        return tuple(-(-s // b) for s, b in zip(self.shape, self.block, strict=True))

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """Block sizes per axis in dask's ``chunks`` form."""
        return tuple(
            tuple(min(b, s - i) for i in range(0, s, b)) or (0,)
            for s, b in zip(self.shape, self.block, strict=True)
        )

    def check(self, index: Sequence[int]) -> BlockIndex:
        """Validate a block index and return it as a tuple of ints."""
        index = tuple(int(i) for i in index)
        if len(index) != self.ndim:
            raise BlockIndexError(f"block index {index} has {len(index)} axes, expected {self.ndim}")
        for axis, (i, n) in enumerate(zip(index, self.nblocks, strict=True)):
            if not 0 <= i < n:
                raise BlockIndexError(
                    f"block index {index} is out of range on axis {axis} (0..{n - 1})"
                )
        return index

    def slices(self, index: Sequence[int]) -> tuple[slice, ...]:
        """Element slices of one block."""
        index = self.check(index)
        return tuple(
            slice(i * b, min((i + 1) * b, s))
            for i, b, s in zip(index, self.block, self.shape, strict=True)
        )

    def indices(self) -> Iterator[BlockIndex]:
        """Every block index, in C order."""
        return itertools.product(*(range(n) for n in self.nblocks))

    def ball(
        self, center: Sequence[int], radius: int, time_axis: int | None = 0
    ) -> Iterator[BlockIndex]:
        """Blocks within ``radius`` hops of ``center``, nearest first, clipped to the grid.

        Ties are broken by C order so the order is deterministic.
        """
        center = self.check(center)
        for r in range(radius + 1):
            yield from self.shell(center, r, time_axis)

    def shell(
        self, center: Sequence[int], r: int, time_axis: int | None = 0
    ) -> Iterator[BlockIndex]:
        """Blocks exactly ``r`` hops from ``center`` (clipped to the grid), in C order."""
        center = tuple(center)
        ranges = [
            range(max(0, c - r), min(n, c + r + 1))
            for c, n in zip(center, self.nblocks, strict=True)
        ]
        for index in itertools.product(*ranges):
            if distance(index, center, time_axis) == r:
                yield index
