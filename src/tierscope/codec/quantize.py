"""Prequantisation with a verified pointwise bound, shared by every error-bounded predictor.

``prequantise`` maps a float32/float64 block to integer codes ``q = rint(x / step)`` (float64
arithmetic) and checks every point's reconstruction against ``tol``; points that fail, non-finite
points and codes too large to convert exactly become *outliers* (flat index + raw value, stored
exactly).  Predictors then work on the integer ``q`` losslessly, so the bound proven here is the
bound of the decoded block whatever the predictor.

``reconstruct`` is the one formula decode uses, written for any array namespace ``xp`` (NumPy or
CuPy): a single correctly rounded IEEE multiply in the frame dtype, no FMA-contractible ``a*b+c``,
so a GPU decode is bit-identical to the CPU one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Q_LIMIT", "Quantised", "choose_step", "prequantise", "reconstruct", "verify"]

# q must convert to the float dtype exactly: |q| < 2**(mantissa bits + 1) would do, the
# stricter 2**24 / 2**52 keeps a margin.
Q_LIMIT = {4: float(2**24), 8: float(2**52)}
_STEP_MARGIN = 1.0 - 2.0**-18


def choose_step(dtype: np.dtype, tol: float) -> np.floating:
    """Largest dtype value <= 2 tol (1 - 2**-18), clamped to the dtype's max; may be 0.

    The margin keeps float64 rounding of ``x / step`` from pushing a point over the bound; the
    step is a dtype value so that decode multiplies by exactly what encode verified.
    """
    target = min(2.0 * tol * _STEP_MARGIN, float(np.finfo(dtype).max))
    step = dtype.type(target)
    if float(step) > target:
        step = np.nextafter(step, dtype.type(0))
    return step


def reconstruct(xp: Any, q: Any, dtype: np.dtype, step: np.floating) -> Any:
    """``q.astype(dtype) * step`` as one IEEE multiply in ``dtype``; identical in NumPy and CuPy.

    ``q`` converts exactly (``|q| < Q_LIMIT``).  Do not rewrite it as ``q * float(step)``
    (float64 detour) nor fuse it with an add (FMA contraction on GPUs changes the rounding).
    """
    out = q.astype(dtype)
    with np.errstate(over="ignore"):  # only outliers (overwritten later) can overflow
        out *= xp.asarray(step, dtype=dtype)
    return out


def verify(x: Any, recon: Any, tol: float, xp: Any = np) -> Any:
    """Mask of points whose reconstruction is provably within ``tol`` (exact comparison).

    float32: two float32 values differ exactly in float64 whenever the difference could be near
    ``tol``.  float64: ``fl(|x - x'|) < tol`` implies the exact difference is ``< tol``; ties
    are refused.  Non-finite points are never within the bound.  Only a subtraction, an ``abs``
    and a comparison, each its own ufunc: nothing a GPU compiler could contract.
    """
    with np.errstate(all="ignore"):
        if x.dtype.itemsize == 4:
            return xp.abs(x.astype(np.float64) - recon.astype(np.float64)) <= tol
        return xp.abs(x - recon) < tol


@dataclass(frozen=True)
class Quantised:
    """Integer codes of a block plus its exactly stored outliers."""

    q: Any  # int64, the block's shape; outliers hold a filler code (previous regular q)
    indices: Any  # int64 flat C-order indices of the outliers, increasing
    values: Any  # the outliers' raw values, native dtype


def prequantise(x: Any, step: np.floating, tol: float, xp: Any = np) -> Quantised:
    """Quantise ``x`` (native float32/float64, C order) and verify ``|x - x'| <= tol`` per point.

    Runs in array namespace ``xp`` (NumPy, or CuPy for the GPU encoder) with correctly rounded
    float64 ops only (divide, rint), so both give the same codes bit for bit.  Outliers' codes are
    replaced by the previous (C-order) regular point's code so that any predictor sees a smooth
    filler and they cost (almost) nothing in the residual stream.  ``indices`` and ``values``
    stay in ``xp``.
    """
    dtype = x.dtype
    with np.errstate(all="ignore"):
        q64 = x.astype(np.float64)  # always a fresh array
        q64 /= float(step)
        xp.rint(q64, out=q64)
        ok = xp.abs(q64) < Q_LIMIT[dtype.itemsize]  # False for NaN/Inf too
        q64[~ok] = 0.0
        q = q64.astype(np.int64)
        del q64
        ok &= verify(x, reconstruct(xp, q, dtype, step), tol, xp)
    flat_ok = ok.reshape(-1)
    bad = xp.flatnonzero(~flat_ok).astype(np.int64)
    if bad.size:
        # the previous regular point of each outlier: the (count of regular points so far)-th one
        good = xp.flatnonzero(flat_ok)
        qf = q.reshape(-1)
        before = xp.cumsum(flat_ok, dtype=np.int64)[bad] - 1
        filler = qf[good[xp.maximum(before, 0)]] if good.size else xp.zeros_like(bad)
        qf[bad] = xp.where(before >= 0, filler, 0)
    return Quantised(q=q, indices=bad, values=x.reshape(-1)[bad])
