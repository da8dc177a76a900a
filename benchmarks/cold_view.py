"""Where the time of one cold view goes, end to end, on the `large` preset (a 512 x 512 z-slice of 64
blocks of 1 MiB), next to xarray + zarr over HTTP in the same run.

    python benchmarks/cold_view.py [--link 1gbit,0.1ms] [--views 6] [--live] [--prefetch off]

Each view is at a new time step (nothing cached anywhere). For tierscope it reports the client's wall
time and, from Dask's task stream and tierscope's counters, how long the graph took to reach the first
block load (client + scheduler), the span of the block loads on the workers, and the summed stage times:
network, server (origin read + encode) and decode on the workers; origin read and encode on the server.
``--live`` serves the raw store (encode on demand) instead of the store pre-encoded at the view's tol.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy as np
import xarray as xr
from distributed import Client, LocalCluster

import tierscope
from tierscope.bench.link import parse_link
from tierscope.bench.replay import PRESETS, prepare_data, value_range
from tierscope.bench.systems import Testbed, _http_json
from tierscope.demo import default_cache_dir


def _stages(client: Client) -> dict[str, float]:
    workers = tierscope.stats(client)["workers"].values()
    return {stage: sum(w["stage_s"][stage] for w in workers) for stage in ("network", "server", "decode")}


def _total_ms(stats: dict, stage: str) -> float:
    return stats["stages"][stage]["mean_ms"] * stats["stages"][stage]["count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--link", default="1gbit,0.1ms")
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("--tol", type=float, default=1e-3, help="fraction of the value range")
    parser.add_argument("--live", action="store_true", help="encode on demand (the raw store)")
    parser.add_argument("--prefetch", default="off")
    args = parser.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)
    preset = PRESETS["large"]
    data = prepare_data(default_cache_dir() / "bench", preset, formats=())
    tol = args.tol * value_range(data)
    store = data.zarr if args.live else data.encoded(tol)
    rows: dict[str, list[dict[str, float]]] = {"tierscope": [], "zarr-http": []}
    with (
        LocalCluster(n_workers=preset.workers, threads_per_worker=preset.threads, dashboard_address=None,
                     silence_logs=logging.ERROR) as cluster,
        Client(cluster) as client,
        Testbed(data, client, parse_link(args.link)) as bed,
    ):
        server, url = bed.block_server("lorenzo", store)
        _http_json("PUT", f"{server.url}/config", {"l3": 0, "l4": 0, "prefetch": args.prefetch})
        tierscope.connect(client, l1="2GiB", l2="4GiB", prefetch=args.prefetch)
        t0 = time.perf_counter()
        ds = xr.open_dataset(f"{url}/datasets/{data.name}", engine="tierscope", tol=tol)
        print(f"open_dataset: {(time.perf_counter() - t0) * 1e3:.0f} ms")
        base = xr.open_zarr(bed.static_url(), consolidated=False, chunks={})
        for k in range(args.views):
            t, z = k % preset.shape[0], (37 * k + 5) % preset.shape[1]
            before_server = _http_json("GET", f"{server.url}/stats")
            before = _stages(client)
            client.get_task_stream()  # clears nothing; the window below is ours
            start = time.time()
            t0 = time.perf_counter()
            got = ds[data.variable].isel(time=t, z=z).values
            wall = time.perf_counter() - t0
            stream = [task for task in client.get_task_stream(start=start)
                      if str(task["key"]).startswith("('tierscope")]
            after, after_server = _stages(client), _http_json("GET", f"{server.url}/stats")
            first = min((s["start"] for task in stream for s in task["startstops"]), default=start) - start
            last = max((s["stop"] for task in stream for s in task["startstops"]), default=start) - start
            row = {"wall_ms": wall * 1e3, "to_first_task_ms": first * 1e3,
                   "task_span_ms": (last - first) * 1e3, "after_last_task_ms": (wall - last) * 1e3,
                   **{f"{s}_ms": (after[s] - before[s]) * 1e3 for s in after},
                   "server_read_ms": _total_ms(after_server, "read") - _total_ms(before_server, "read"),
                   "server_encode_ms": _total_ms(after_server, "encode") - _total_ms(before_server, "encode"),
                   "server_encodes": after_server["encodes"] - before_server["encodes"]}
            rows["tierscope"].append(row)
            t0 = time.perf_counter()
            ref = base[data.variable].isel(time=t, z=z).values
            rows["zarr-http"].append({"wall_ms": (time.perf_counter() - t0) * 1e3})
            assert np.nanmax(np.abs(got - ref)) <= tol * (1 + 1e-6)
            print(json.dumps({k: round(v, 1) for k, v in row.items()}), f"zarr-http {rows['zarr-http'][-1]['wall_ms']:.0f} ms")
    for system, values in rows.items():
        walls = [r["wall_ms"] for r in values]
        print(f"{system}: first {walls[0]:.0f} ms, later mean {statistics.mean(walls[1:]):.0f} ms")


if __name__ == "__main__":
    main()
