"""Do workers stay within their tier capacities over a long session? (harness target: +10% over 1,000 views)

A LocalCluster with 2 worker processes, tiers of --l1/--l2 per worker, prefetch auto and the distance
policy; a long random-jump sequence (local steps mixed with jumps anywhere, so the tiers fill, evict and
prefetch all the time) replayed without think time. Every 50 views it samples each worker's resident
memory (RSS) and its tiers' bytes. Reported: the growth of RSS over the idle worker with tierscope's
plugins installed, against l1 + l2. Run: python benchmarks/worker_memory.py --views 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import xarray as xr
from dask.utils import format_bytes, parse_bytes

import tierscope
from tierscope.bench.patterns import generate
from tierscope.grid import BlockGrid
from tierscope.server import BlockService, ServerThread
from tierscope.store import write_sample
from tierscope.store.origin import ZarrOrigin


def rss(dask_worker) -> int:  # noqa: ANN001 - client.run passes the worker
    import psutil

    return psutil.Process().memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="64,64,128,128")
    parser.add_argument("--block", default="1,16,32,32")
    parser.add_argument("--views", type=int, default=1000)
    parser.add_argument("--l1", default="32MiB")
    parser.add_argument("--l2", default="64MiB")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    block = tuple(int(v) for v in args.block.split(","))
    budget = parse_bytes(args.l1) + parse_bytes(args.l2)
    seq = generate("random_jumps", BlockGrid(shape, block), args.views, seed=3)

    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        store = write_sample(Path(tmp) / "mem.zarr", shape=shape, block=block, variables=("u",))
        with (ServerThread(BlockService([ZarrOrigin(store)])) as server,
              LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None) as cluster,
              Client(cluster) as client):
            tierscope.connect(client, l1=args.l1, l2=args.l2, policy="distance", prefetch="auto")
            ds = xr.open_dataset(f"{server.url}/datasets/mem", engine="tierscope", tol=1e-3)
            ds.u.isel(seq.views[0].isel()).values  # imports and connections, before the baseline
            base = client.run(rss)
            for i, view in enumerate(seq.views, 1):
                ds.u.isel(view.isel()).values
                if i % 50 == 0 or i == len(seq.views):
                    now, stats = client.run(rss), tierscope.stats(client)["workers"]
                    for worker, value in now.items():
                        held = stats[worker]["l1"]["nbytes"] + stats[worker]["l2"]["nbytes"]
                        samples.append({"view": i, "worker": worker, "growth": value - base[worker],
                                        "tiers": held})
                    worst = max(s["growth"] for s in samples if s["view"] == i)
                    print(f"view {i:5d}: max RSS growth {format_bytes(worst)}, tiers hold up to "
                          f"{format_bytes(max(s['tiers'] for s in samples if s['view'] == i))} "
                          f"(budget {format_bytes(budget)} per worker)", flush=True)
    peak = max(s["growth"] for s in samples)
    print(f"peak RSS growth {format_bytes(peak)} = {peak / budget:.0%} of l1 + l2 ({format_bytes(budget)})")
    if args.out:
        Path(args.out).write_text(json.dumps({"budget": budget, "samples": samples}, indent=1))


if __name__ == "__main__":
    main()
