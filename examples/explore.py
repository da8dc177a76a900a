"""Open the sample dataset with engine="tierscope" on a LocalCluster, slice it and view it progressively.

    python examples/explore.py [STORE]

Without STORE a small sample dataset with coarse levels is written to a temporary directory first. The
dataset is served by a real block server on loopback, exactly as a remote server would serve it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import xarray as xr
from distributed import Client, LocalCluster

import tierscope
from tierscope.server import BlockService, ServerThread
from tierscope.store import pyramid, write_sample
from tierscope.store.origin import ZarrOrigin


def main(store: Path) -> None:
    with (
        ServerThread(BlockService([ZarrOrigin(store)])) as server,
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        tierscope.connect(client, l1="128MiB", l2="256MiB")
        ds = xr.open_dataset(f"{server.url}/datasets/turb", engine="tierscope", tol=0)
        print(ds)

        plane = ds.u.isel(time=2, z=10)                      # one z-slice of one time step
        print("u at t=2, z=10: mean", float(plane.mean()), "shape", plane.shape)
        column = ds.p.sel(x=ds.x[5], y=ds.y[7]).values       # a (time, z) column across blocks
        print("p column shape", column.shape)
        ds.u.isel(time=2, z=10).values                       # the same view again: L1 hits
        for part in tierscope.progressive(ds.u.isel(time=3, z=10)):  # coarse levels first, level 0 last
            print("progressive: level", part.encoding["tierscope_level"], "shape", part.shape)

        total = tierscope.stats(client)["total"]
        print(f"L1 hit ratio {total['l1']['hit_ratio']:.0%}, L2 hit ratio "
              f"{total['l2']['hit_ratio']:.0%}, server fetches {total['fetches']}")
        assert total["l1"]["hits"] > 0


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            sample = write_sample(Path(tmp) / "turb.zarr", shape=(4, 32, 64, 64), block=(1, 8, 16, 16))
            pyramid(sample)  # levels 1 and 2
            main(sample)
