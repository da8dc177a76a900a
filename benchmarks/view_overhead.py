"""Where the time of one view goes: tierscope's tiers in-process vs through a LocalCluster.

    python benchmarks/view_overhead.py [STORE]

STORE defaults to the demo's small sample (created if absent). Prints medians of 30 repeats.
"""

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import xarray as xr
from distributed import Client, LocalCluster

import tierscope
from tierscope.server import BlockService, ServerThread
from tierscope.store import write_sample
from tierscope.store.origin import ZarrOrigin

def bench(fn, n=30):
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)

def main(store: Path) -> None:
    logging.getLogger("distributed").setLevel(logging.ERROR)
    with ServerThread(BlockService([ZarrOrigin(store)])) as server:
        ds = xr.open_dataset(f"{server.url}/datasets/turb", engine="tierscope")

        def view():
            return ds.u.isel(time=1, z=3).values  # one z-slice: 4 blocks

        tierscope.connect(None, l1="256MiB", l2="256MiB")
        print(f"no cluster, L1 hit view: {bench(view):.2f} ms")
        tierscope.connect(None, l1=0, l2=0)
        print(f"no cluster, tiers off (server each time): {bench(view):.2f} ms")
        with (
            LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None,
                         silence_logs=logging.ERROR) as cluster,
            Client(cluster) as client,
        ):
            tierscope.connect(client, l1="256MiB", l2="256MiB")
            print(f"LocalCluster, L1 hit view: {bench(view):.2f} ms")
            trivial = da.ones((4,), chunks=2).sum()
            print(f"LocalCluster, trivial 2-task dask compute: {bench(trivial.compute):.2f} ms")

if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(write_sample(Path(tmp) / "turb.zarr", shape=(6, 32, 64, 64), block=(1, 16, 32, 32)))
