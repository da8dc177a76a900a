"""tierscope: explore massive remote arrays interactively with xarray and Dask through tiered caches.

>>> import xarray as xr, tierscope                                        # doctest: +SKIP
>>> client = tierscope.connect(client, l1="2GiB", l2="4GiB")              # doctest: +SKIP
>>> ds = xr.open_dataset("http://host:8765/datasets/turb", engine="tierscope", tol=0)  # doctest: +SKIP
>>> tierscope.stats(client)                                               # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version

from tierscope.dask.connect import connect, stats, stats_table

try:
    __version__ = version("tierscope")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

__all__ = ["__version__", "connect", "stats", "stats_table"]
