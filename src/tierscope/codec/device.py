"""Where encode/decode run: "cpu" (NumPy) or "gpu" (CuPy), and "auto" resolving to whichever is there.

CuPy is an optional dependency, so it is imported only when a GPU is asked for; asking for one without
CuPy or without a usable CUDA device is a RuntimeError that says which is missing, raised before any work.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DEVICES", "check_device", "gpu_available", "import_cupy", "resolve_device", "to_host"]

DEVICES = ("cpu", "gpu")
_CHOICES = ("auto", *DEVICES)


def import_cupy() -> Any:
    """CuPy with at least one usable CUDA device, else a RuntimeError naming what is missing."""
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(f"device='gpu' needs CuPy, which is not importable: {exc}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA errors have driver-specific types
        raise RuntimeError(f"device='gpu' needs a CUDA GPU, but none is usable: {exc}") from None
    if count < 1:
        raise RuntimeError("device='gpu' needs a CUDA GPU, but none was found")
    return cupy


def gpu_available() -> bool:
    """Whether ``device="gpu"`` would work here (CuPy imports and sees a CUDA device)."""
    try:
        import_cupy()
    except RuntimeError:
        return False
    return True


def check_device(device: str, what: str = "device") -> str:
    """``device`` if it names a choice ("auto", "cpu", "gpu"), else a ValueError; checks no hardware.

    For settings resolved elsewhere later (e.g. on each Dask worker, which may differ from the client).
    """
    if device not in _CHOICES:
        raise ValueError(f"{what} must be one of {', '.join(_CHOICES)}, got {device!r}")
    return device


def resolve_device(device: str, what: str = "device") -> str:
    """"cpu" or "gpu" for a requested "auto"/"cpu"/"gpu"; "gpu" without one is a RuntimeError now."""
    check_device(device, what)
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu":
        import_cupy()
    return device


def to_host(xp: Any, array: Any) -> np.ndarray:
    """``array`` of namespace ``xp`` as a host NumPy array (no copy when it already is one)."""
    asnumpy = getattr(xp, "asnumpy", None)
    return np.asarray(array) if asnumpy is None else asnumpy(array)
