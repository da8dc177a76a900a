"""A synthetic, turbulence-like (time, z, y, x) dataset, so tierscope can be developed, tested and
benchmarked at any size without real simulation output.

Each variable is a periodic 3-D Gaussian random field on ``[0, 2*pi)^3`` whose energy spectrum
follows Kolmogorov's ``E(k) ~ k^-5/3`` up to a smooth Gaussian dissipation cutoff, with the mean
(``k = 0``) mode removed. Pressure ``p`` uses the steeper ``k^-7/3`` of pressure fluctuations in
isotropic turbulence. Time advances the phase of every Fourier mode at ``omega_k ~ k^(2/3)`` (the
inverse eddy-turnover time at scale ``1/k``): large scales drift slowly and small ones decorrelate
fast, so consecutive steps are strongly correlated (about 0.97) but never identical.

The store is written one time block (``block[0]`` steps, usually one) at a time, so memory stays at
a few steps per variable whatever the length of the time axis. Output is bit-identical for the same
seed and shape: each variable draws its coefficients from a generator seeded by
``(seed, crc32(name))``, so a field also does not depend on which other variables are written.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from tierscope.store.ingest import _positive_ints

__all__ = ["SampleVariable", "sample_coords", "sample_field", "write_sample"]

DIMS = ("time", "z", "y", "x")
DT = 0.1
"""Simulation time between two stored steps, in seconds."""
OMEGA0 = 1.0
"""Angular frequency (rad/s) of the ``|k| = 1`` modes; ``|k|`` turns at ``OMEGA0 * |k|^(2/3)``."""
CUTOFF = 0.75
"""Dissipation wavenumber, as a fraction of the coarsest axis' Nyquist wavenumber."""

_SLOPES = {"p": -7.0 / 3.0}
_DEFAULT_SLOPE = -5.0 / 3.0
_ATTRS = {
    "u": ("x-velocity", "m s-1"),
    "v": ("y-velocity", "m s-1"),
    "w": ("z-velocity", "m s-1"),
    "p": ("pressure fluctuation", "Pa"),
}


def write_sample(
    out: str | Path,
    shape: Sequence[int] = (16, 64, 128, 128),
    block: Sequence[int] = (1, 32, 64, 64),
    variables: Sequence[str] = ("u", "v", "w", "p"),
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a synthetic turbulence-like zarr v3 store chunked by ``block``; return its path.

    ``progress(steps_written, steps)`` is called after each time block: a large sample takes minutes."""
    shape = _positive_ints(shape, "shape", ndim=4)
    block = _positive_ints(block, "block", ndim=len(shape))
    names = _check_variables(variables)
    seed = _check_seed(seed)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")

    generator = _Generator(shape[1:], {name: _rng(seed, name) for name in names})
    mode = "w" if overwrite else "w-"
    _layout(shape, block, names, seed).to_zarr(
        out, zarr_format=3, consolidated=False, mode=mode, compute=False
    )
    for t0 in range(0, shape[0], block[0]):
        t1 = min(t0 + block[0], shape[0])
        steps = [generator.step(t * DT) for t in range(t0, t1)]
        data = {name: (DIMS, np.stack([step[name] for step in steps])) for name in names}
        xr.Dataset(data).to_zarr(out, region={"time": slice(t0, t1)}, consolidated=False)
        if progress is not None:
            progress(t1, shape[0])
    return out


def sample_field(space: Sequence[int], name: str = "u", seed: int = 0, step: int = 0) -> np.ndarray:
    """One variable's float32 field over ``space`` at time step ``step``: exactly what ``write_sample``
    stores there (benchmarks use it to get the same fields in memory)."""
    return SampleVariable(space, name, seed).step(step)


class SampleVariable:
    """One variable of the sample over the periodic ``space``, computed one time step at a time.

    Drawing the coefficients costs a forward FFT (the std normalisation) and each step an inverse one:
    keep the object to compute many steps (the synthetic origin keeps one per variable). Thread-safe:
    ``step`` changes nothing."""

    def __init__(self, space: Sequence[int], name: str = "u", seed: int = 0) -> None:
        self.space, self.name = tuple(int(n) for n in space), name
        self._generator = _Generator(self.space, {name: _rng(_check_seed(seed), name)})

    def step(self, step: int) -> np.ndarray:
        """The float32 field at time step ``step``: exactly what ``write_sample`` stores there."""
        return self._generator.step(int(step) * DT)[self.name]


def _check_variables(variables: Sequence[str]) -> tuple[str, ...]:
    if isinstance(variables, str):
        raise ValueError(f"variables must be a sequence of names, not the string {variables!r}")
    names = tuple(variables)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"variables must be non-empty names, at least one, got {variables!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"variable names must be unique, got {names!r}")
    if set(names) & set(DIMS):
        raise ValueError(f"variable names must differ from the dimensions {DIMS}, got {names!r}")
    return names


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _rng(seed: int, name: str) -> np.random.Generator:
    """One generator per (seed, variable): ``crc32`` is stable across runs, unlike ``hash()``."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _slope(name: str) -> float:
    return _SLOPES.get(name, _DEFAULT_SLOPE)


class _Generator:
    """The variables' Fourier coefficients; ``step(t)`` turns them into real fields at time ``t``.

    Memory: one complex64 half-spectrum per variable (the size of one float32 step) plus the shell
    index, whatever the number of steps."""

    def __init__(self, space: tuple[int, ...], rngs: dict[str, np.random.Generator]) -> None:
        self._space = space
        k = _wavenumbers(space)
        # |k| takes few distinct values: turn those, then spread them over the grid (10x faster)
        shells, self._shell = np.unique(k, return_inverse=True)
        self._omega = OMEGA0 * shells ** (2.0 / 3.0)
        cutoff = CUTOFF * min((n // 2 for n in space if n > 1), default=1)
        self._coeffs = {
            name: self._draw(k, _slope(name), cutoff, rng) for name, rng in rngs.items()
        }

    def step(self, t: float) -> dict[str, np.ndarray]:
        phase = np.exp(1j * (self._omega * t)).astype(np.complex64)[self._shell]
        return {name: self._field(coeffs * phase) for name, coeffs in self._coeffs.items()}

    def _draw(
        self, k: np.ndarray, slope: float, cutoff: float, rng: np.random.Generator
    ) -> np.ndarray:
        """Complex Gaussian coefficients shaped by the spectrum, for a unit-std field at t=0."""
        noise = rng.standard_normal((2, *k.shape))
        amplitude = _amplitude(k, slope, cutoff) * _plane_weight(self._space)
        coeffs = (noise[0] + 1j * noise[1]) * amplitude
        std = float(self._field(coeffs).std())
        return (coeffs / std if std > 0 else coeffs).astype(np.complex64)

    def _field(self, coeffs: np.ndarray) -> np.ndarray:
        field = np.fft.irfftn(coeffs, s=self._space, axes=range(len(self._space)))
        return field.astype(np.float32, copy=False)


def _wavenumbers(space: tuple[int, ...]) -> np.ndarray:
    """``|k|`` on the half-spectrum grid of ``numpy.fft.rfftn`` for a periodic box of side 2*pi."""
    *full, last = space
    axes = [np.fft.fftfreq(n, 1.0 / n) for n in full] + [np.fft.rfftfreq(last, 1.0 / last)]
    return np.sqrt(sum(k**2 for k in np.meshgrid(*axes, indexing="ij", sparse=True)))


def _plane_weight(space: tuple[int, ...]) -> np.ndarray:
    """``sqrt(2)`` on the ``k_x = 0`` (and even-size Nyquist) planes, 1 elsewhere.

    ``irfftn`` keeps only the Hermitian part of those planes, where a mode and its mirror are
    drawn independently, which halves their energy: the weight gives every shell its full energy."""
    last = space[-1]
    weight = np.ones(last // 2 + 1)
    weight[0] = math.sqrt(2.0)
    if last % 2 == 0:
        weight[-1] = math.sqrt(2.0)
    return weight


def _amplitude(k: np.ndarray, slope: float, cutoff: float) -> np.ndarray:
    """Mode amplitude for ``E(k) ~ k^slope * exp(-(k/cutoff)^2)``: a shell holds ~4*pi*k^2 modes."""
    with np.errstate(divide="ignore"):
        energy = k**slope * np.exp(-((k / cutoff) ** 2)) / (4 * math.pi * k**2)
    return np.sqrt(np.where(k > 0, energy, 0.0))


def _layout(
    shape: tuple[int, ...], block: tuple[int, ...], names: tuple[str, ...], seed: int
) -> xr.Dataset:
    """Coordinates, attributes and never-computed placeholder data, written before any step.

    The placeholder is a single dask chunk: it only has to align with the zarr chunks, and a
    block-sized one would build a task per block for nothing."""
    coords = {dim: (dim, values, attrs) for dim, (values, attrs) in sample_coords(shape).items()}
    placeholder = da.zeros(shape, chunks=shape, dtype=np.float32)
    data = {name: (DIMS, placeholder, _variable_attrs(name)) for name in names}
    ds = xr.Dataset(data, coords=coords, attrs=_dataset_attrs(seed))
    for name in names:
        ds[name].encoding = {"chunks": block}
    return ds


def sample_coords(shape: Sequence[int]) -> dict[str, tuple[np.ndarray, dict[str, str]]]:
    """The dimension coordinates of a sample of ``shape``: time in steps of ``DT`` seconds, and
    positions on ``[0, 2*pi)`` along each spatial axis."""
    coords = {"time": (_times(shape[0]), {"units": "s", "long_name": "simulation time"})}
    for dim, n in zip(DIMS[1:], shape[1:], strict=True):
        coords[dim] = (np.arange(n) * (2 * math.pi / n), {"units": "m", "long_name": f"{dim} position"})
    return coords


def _times(steps: int) -> np.ndarray:
    """``i * DT`` as the float nearest the decimal (0.3, not 0.30000000000000004), so ``sel(time=0.3)``
    finds step 3: an exact integer product divided once, which IEEE division rounds correctly."""
    dt = Fraction(DT).limit_denominator(10**9)
    return np.arange(steps) * dt.numerator / dt.denominator


def _variable_attrs(name: str) -> dict[str, str]:
    long_name, units = _ATTRS.get(name, (f"synthetic field {name}", "1"))
    return {"long_name": long_name, "units": units, "spectrum": _spectrum_label(_slope(name))}


def _spectrum_label(slope: float) -> str:
    return f"k^-{round(-slope * 3)}/3"


def _dataset_attrs(seed: int) -> dict[str, object]:
    return {
        "title": "tierscope synthetic turbulence sample",
        "seed": seed,
        "spectrum": _spectrum_label(_DEFAULT_SLOPE),
        "generator": "tierscope.sample",
    }
