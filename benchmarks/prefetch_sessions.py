"""What the scheduler's prefetch buys a session: L1 hit ratio and view latency, prefetch off vs each mode.

One block server (L3/L4 on, server prefetch off so only worker prefetch differs) and one LocalCluster
with 2 worker processes; the same saved playback, scanning and wandering sequences are replayed with a
think time before each view against every prefetch mode. Run: python benchmarks/prefetch_sessions.py
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

import tierscope
from tierscope.bench.patterns import generate
from tierscope.grid import BlockGrid
from tierscope.server import BlockService, ServerThread
from tierscope.store import write_sample
from tierscope.store.origin import ZarrOrigin


def replay(client, url: str, views, think: float) -> dict[str, float]:
    ds = xr.open_dataset(url, engine="tierscope")
    latencies, hits, looks = [], 0, 0
    for i, view in enumerate(views):
        time.sleep(think)
        before = tierscope.stats(client)["total"]["l1"]
        t0 = time.perf_counter()
        ds.u.isel(view.isel()).values
        latencies.append((time.perf_counter() - t0) * 1e3)
        after = tierscope.stats(client)["total"]["l1"]
        if i >= 3:  # the first views only teach the predictors
            hits += after["hits"] - before["hits"]
            looks += after["hits"] + after["misses"] - before["hits"] - before["misses"]
    return {
        "l1_hit_ratio": hits / looks if looks else 0.0,
        "mean_ms": statistics.fmean(latencies[3:]),
        "p50_ms": float(np.percentile(latencies[3:], 50)),
        "p95_ms": float(np.percentile(latencies[3:], 95)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="32,64,128,128")
    parser.add_argument("--block", default="1,16,32,32")
    parser.add_argument("--views", type=int, default=40)
    parser.add_argument("--think", type=float, default=100.0, help="ms before each view")
    parser.add_argument("--l1", default="4MiB", help="per worker (small on purpose: the radius matters)")
    parser.add_argument("--l2", default="8MiB")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    block = tuple(int(v) for v in args.block.split(","))
    grid = BlockGrid(shape, block)
    sequences = [generate(p, grid, args.views, seed=1) for p in ("playback", "scanning", "wandering")]

    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = write_sample(Path(tmp) / "bench.zarr", shape=shape, block=block, variables=("u",))
        service = BlockService([ZarrOrigin(store)], l3="256MiB", l4="512MiB", prefetch="off")
        with (ServerThread(service) as server,
              LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None) as cluster,
              Client(cluster) as client):
            url = f"{server.url}/datasets/bench"
            for seq in sequences:
                for mode in ("off", "neighbourhood", "momentum", "playback", "auto"):
                    tierscope.connect(client, l1=args.l1, l2=args.l2, policy="distance", prefetch=mode)
                    row = {"pattern": seq.pattern, "prefetch": mode,
                           **replay(client, url, seq.views, args.think / 1e3)}
                    rows.append(row)
                    print(f"{row['pattern']:<10} {mode:<13} L1 hits {row['l1_hit_ratio']:6.1%}  "
                          f"mean {row['mean_ms']:6.1f}  p50 {row['p50_ms']:6.1f}  p95 {row['p95_ms']:6.1f} ms",
                          flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
