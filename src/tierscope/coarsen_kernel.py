"""The compiled loop behind levels' window means: NumPy's sums in NumPy's order, in one pass.

A level's mean must equal xarray's ``coarsen(...).mean()`` bit for bit, so its sums must add the same
values in the same order as ``np.add.reduce`` over the reshaped window axes: into each output value,
one after the other, the pairwise sum of each run of the innermost window axis (``levels._window_sum``
explains the layout). NumPy does that with one inner-loop call per run of 2 to 16 values, slow enough
to add 0.2-0.3x to an ingest's time; this loop reads each value once, in memory order, and does the
same additions, 1.5-2.5x faster. Compiled by Numba on first use (cached on disk: ~0.3 s per process
afterwards, with Numba's import), without the GIL: Dask's threads coarsen pieces side by side.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["MAX_RUN", "level_sums", "window_sums"]

MAX_RUN = 128
"""Longest run NumPy sums with the unrolled pairwise loop below; longer ones it splits recursively."""


@numba.njit(nogil=True, cache=True, inline="always")
def _run_sum(flat, at, n):  # pragma: no cover - compiled
    """NumPy's pairwise sum of ``flat[at:at + n]``: below 8 values one after the other; else 8 partial
    sums of every 8th value, added as a tree, then the rest one by one."""
    if n < 8:
        total = flat[at]
        for r in range(1, n):
            total += flat[at + r]
        return total
    p0, p1, p2, p3 = flat[at], flat[at + 1], flat[at + 2], flat[at + 3]
    p4, p5, p6, p7 = flat[at + 4], flat[at + 5], flat[at + 6], flat[at + 7]
    end = n - n % 8
    for r in range(at + 8, at + end, 8):
        p0 += flat[r]
        p1 += flat[r + 1]
        p2 += flat[r + 2]
        p3 += flat[r + 3]
        p4 += flat[r + 4]
        p5 += flat[r + 5]
        p6 += flat[r + 6]
        p7 += flat[r + 7]
    total = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))
    for r in range(at + end, at + n):
        total += flat[r]
    return total


@numba.njit(nogil=True, cache=True)
def _sums(flat, shape, out):  # pragma: no cover - compiled
    """``out[a, b, c]`` += the run sums of ``values[a, :, b, :, c]``, in (i, j) order, ``values`` being
    ``flat`` in ``shape`` (outer, window, middle, window, inner, run). NumPy starts ``out`` at 0 (so a
    window of -0.0 sums to +0.0)."""
    na, ni, nb, nj, nc, n = shape
    at = 0
    for a in range(na):
        for _ in range(ni):
            for b in range(nb):
                row = (a * nb + b) * nc
                for _ in range(nj):
                    _add_runs(flat[at:at + nc * n], out[row:row + nc], n)
                    at += nc * n


@numba.njit(nogil=True, cache=True)
def _add_runs(runs, into, n):  # pragma: no cover - compiled
    """``into[c]`` += the sum of ``runs[n * c:n * (c + 1)]``: loops on views, one per common run length,
    simple enough for the compiler to run on vectors of outputs."""
    if n == 2:
        for c in range(into.size):
            into[c] += runs[2 * c] + runs[2 * c + 1]
    elif n == 4:
        for c in range(into.size):
            into[c] += ((runs[4 * c] + runs[4 * c + 1]) + runs[4 * c + 2]) + runs[4 * c + 3]
    elif n == 8:
        for c in range(into.size):
            r = runs[8 * c:8 * c + 8]
            into[c] += ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    elif n == 16:
        for c in range(into.size):
            r = runs[16 * c:16 * c + 16]
            into[c] += (((r[0] + r[8]) + (r[1] + r[9])) + ((r[2] + r[10]) + (r[3] + r[11]))
                        + (((r[4] + r[12]) + (r[5] + r[13])) + ((r[6] + r[14]) + (r[7] + r[15]))))
    else:
        for c in range(into.size):
            into[c] += _run_sum(runs, n * c, n)


@numba.njit(nogil=True, cache=True)
def _level_sums(flat, shape, windows, out, starts):  # pragma: no cover - compiled
    """Every level's window sums in one pass: ``flat`` is (outer, z, y, x) in ``shape``, level ``l``'s
    windows ``windows[l]`` (z, y, x) and its sums ``out[starts[l]:]``, (outer, z / wz, y / wy, x / wx).
    Rows of x arrive in memory order, so the rows of an output's window come in (z, y) order, as in
    ``_sums``: each row, in cache, is added into every level."""
    na, nz, ny, nx = shape
    at = 0
    for a in range(na):
        for z in range(nz):
            for y in range(ny):
                row = flat[at:at + nx]
                for level in range(windows.shape[0]):
                    wz, wy, wx = windows[level, 0], windows[level, 1], windows[level, 2]
                    cols = nx // wx
                    first = starts[level] + ((a * (nz // wz) + z // wz) * (ny // wy) + y // wy) * cols
                    _add_runs(row, out[first:first + cols], wx)
                at += nx


def level_sums(values: np.ndarray, windows: list[tuple[int, int, int]]) -> list[np.ndarray] | None:
    """The window sums of C-contiguous ``values`` at each of several levels, windows ``(wz, wy, wx)`` on
    its last three axes (1 where an axis is not coarsened), in one pass; or None where this loop does
    not apply: another dtype, a window that does not divide its axis, x not coarsened or in one window."""
    if values.dtype not in (np.float32, np.float64) or values.ndim < 3 or not windows:
        return None
    *outer, nz, ny, nx = values.shape
    if any(not 1 < wx < nx or wx > MAX_RUN or nz % wz or ny % wy or nx % wx for wz, wy, wx in windows):
        return None  # (x in one window: NumPy sums the x runs of a y window as one run)
    sizes = [math.prod(outer) * (nz // wz) * (ny // wy) * (nx // wx) for wz, wy, wx in windows]
    starts = np.cumsum([0, *sizes])
    out = np.zeros(starts[-1], values.dtype)
    _level_sums(values.reshape(-1), np.array([math.prod(outer), nz, ny, nx], np.intp),
                np.array(windows, np.intp).reshape(-1, 3), out, starts.astype(np.intp))
    return [out[start:stop].reshape(*outer, nz // wz, ny // wy, nx // wx)
            for start, stop, (wz, wy, wx) in zip(starts[:-1], starts[1:], windows, strict=True)]


def window_sums(values: np.ndarray, layout: list[tuple[int, bool]]) -> np.ndarray | None:
    """The window sums of C-contiguous ``values`` laid out as ``layout`` — (size, is a window) from the
    outermost, neighbours of one kind merged, size-1 axes left out — or None when this loop has no
    such layout (more than three window axes, a run longer than ``MAX_RUN``, another dtype)."""
    if values.dtype not in (np.float32, np.float64, np.intp) or not layout or not layout[-1][1]:
        return None
    run = layout[-1][0]
    kinds = [window for _, window in layout[:-1]]
    if not 1 < run <= MAX_RUN or kinds.count(True) > 2:
        return None
    sizes = [size for size, _ in layout[:-1]]
    if not kinds or kinds[0]:  # an outermost output axis of one
        sizes, kinds = [1, *sizes], [False, *kinds]
    while len(sizes) < 5:  # (outer, window, middle, window, inner): missing ones of size one
        sizes, kinds = [*sizes, 1], [*kinds, not kinds[-1]]
    out = np.zeros(sizes[0] * sizes[2] * sizes[4], values.dtype)
    _sums(values.reshape(-1), np.array([*sizes, run], np.intp), out)
    return out
