"""tierscope: explore massive remote arrays interactively with xarray and Dask through tiered caches.

>>> import xarray as xr, tierscope                                        # doctest: +SKIP
>>> client = tierscope.connect(client, l1="2GiB", l2="4GiB")              # doctest: +SKIP
>>> ds = xr.open_dataset("http://host:8765/datasets/turb", engine="tierscope", tol=0)  # doctest: +SKIP
>>> tierscope.stats(client)                                               # doctest: +SKIP

``connect``, ``stats`` and ``stats_table`` load the Dask layer on first use, so ``import tierscope.codec``
(a worker decoding frames, a zarr codec) does not import dask.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("tierscope")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

__all__ = ["__version__", "connect", "stats", "stats_table"]


def __getattr__(name: str) -> Any:
    if name in ("connect", "stats", "stats_table"):
        import importlib

        return getattr(importlib.import_module("tierscope.dask.connect"), name)
    raise AttributeError(f"module 'tierscope' has no attribute {name!r}")
