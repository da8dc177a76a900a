"""tierscope: explore massive remote arrays interactively with xarray and Dask through tiered caches.

>>> import xarray as xr, tierscope                                        # doctest: +SKIP
>>> client = tierscope.connect(client, l1="2GiB", l2="4GiB")              # doctest: +SKIP
>>> ds = xr.open_dataset("http://host:8765/datasets/turb", engine="tierscope", tol=0)  # doctest: +SKIP
>>> tierscope.stats(client)                                               # doctest: +SKIP
>>> for part in tierscope.progressive(ds.u.isel(time=5, z=10)): ...       # doctest: +SKIP
>>> tierscope.explore(ds["u"])                                            # doctest: +SKIP

``connect``, ``stats`` and ``stats_table`` load the Dask layer on first use, so ``import tierscope.codec``
(a worker decoding frames, a zarr codec) does not import dask; ``progressive`` (``tierscope.refine``) and
``explore`` (``tierscope.explorer``, which needs ipywidgets and matplotlib) load on first use too.
"""

from importlib.metadata import PackageNotFoundError, version
from tierscope._lazy import lazy_exports

try:
    __version__ = version("tierscope")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

# ``explore`` is public too, but needs ipywidgets and matplotlib (extras): ``from tierscope import *``
# must work without them.
__all__ = ["__version__", "connect", "progressive", "stats", "stats_table"]

# Lazy exports: name -> the module defining it (the modules are not named after the functions, since
# importing a submodule sets the package attribute of its name).
_LAZY = {"connect": "tierscope.dask.connect", "stats": "tierscope.dask.connect",
         "stats_table": "tierscope.dask.connect", "progressive": "tierscope.refine",
         "explore": "tierscope.explorer"}

__getattr__ = lazy_exports(__name__, _LAZY)
