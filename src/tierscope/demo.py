"""``tierscope demo``: the main job on an embedded default.

Creates a sample dataset in a cache directory (once), starts a real block server on loopback (L3/L4 and
prefetch on) and a LocalCluster with tierscope's tiers and prefetch, replays a scripted exploration —
scrub time at a fixed z, scrub back, then move through z, with a think time between views as a slider
gives — and prints per-view latency and tier hit ratios next to the same views through ``xr.open_zarr``.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np

__all__ = ["default_cache_dir", "exploration", "run_demo"]


def default_cache_dir() -> Path:
    base = os.environ.get("TIERSCOPE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "tierscope" if base else Path.home() / ".cache" / "tierscope"


def exploration(shape: tuple[int, ...], block: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """The scripted views (phase, t, z): time forward at mid z, time back, then z steps at t=0."""
    nt, nz = shape[0], shape[1]
    z_mid = nz // 2
    views = [("scrub time", t, z_mid) for t in range(nt)]
    views += [("scrub back", t, z_mid) for t in range(nt - 2, -1, -1)]
    step = max(1, block[1] // 4)
    views += [("move z", 0, z) for z in range(0, nz, step)]
    return views


def _summary(ms: list[float]) -> str:
    arr = np.asarray(ms)
    return (f"mean {arr.mean():7.1f}  p50 {np.percentile(arr, 50):7.1f}  "
            f"p95 {np.percentile(arr, 95):7.1f} ms")


def run_demo(
    cache_dir: str | os.PathLike[str] | None = None,
    shape: tuple[int, ...] = (16, 64, 128, 128),
    block: tuple[int, ...] = (1, 32, 64, 64),
    workers: int = 2,
    think: float = 0.1,
) -> dict[str, object]:
    """Run the demo, print its report and return the measured numbers."""
    import xarray as xr
    from distributed import Client, LocalCluster

    import tierscope
    from tierscope.server import BlockService, ServerThread
    from tierscope.store import write_sample
    from tierscope.store.origin import ZarrOrigin

    # LocalCluster(silence_logs=...) restores the previous level on close, so set it here too:
    # the demo's report should not drown in the cluster's shutdown messages.
    logging.getLogger("distributed").setLevel(logging.ERROR)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    store = root / "demo" / f"{'x'.join(map(str, shape))}-{'x'.join(map(str, block))}" / "turb.zarr"
    if not store.exists():
        print(f"creating sample dataset {store} ...", flush=True)
        write_sample(store, shape=shape, block=block)
    views = exploration(shape, block)

    with (
        ServerThread(BlockService([ZarrOrigin(store)], l3="256MiB", l4="512MiB", prefetch="auto")) as server,
        LocalCluster(n_workers=workers, threads_per_worker=2, processes=True,
                     dashboard_address=None, silence_logs=logging.ERROR) as cluster,
        Client(cluster) as client,
    ):
        tierscope.connect(client, l1="256MiB", l2="512MiB", policy="distance", prefetch="auto")
        url = f"{server.url}/datasets/turb"
        print(f"block server {url}; LocalCluster with {workers} worker processes", flush=True)
        ours = xr.open_dataset(url, engine="tierscope", tol=0)
        ref = xr.open_zarr(store, zarr_format=3, consolidated=False)
        rows = []
        print(f"{'view':>4} {'phase':<11} {'t':>3} {'z':>3}  {'tierscope':>10}  {'xr.open_zarr':>12}")
        for i, (phase, t, z) in enumerate(views):
            time.sleep(think)
            t0 = time.perf_counter()
            a = ours.u.isel(time=t, z=z).values
            t1 = time.perf_counter()
            b = ref.u.isel(time=t, z=z).values
            t2 = time.perf_counter()
            if not np.array_equal(a, b, equal_nan=True):
                raise AssertionError(f"view {i} (t={t}, z={z}) differs from xr.open_zarr")
            rows.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3))
            print(f"{i:>4} {phase:<11} {t:>3} {z:>3}  {rows[-1][0]:8.1f}ms  {rows[-1][1]:10.1f}ms",
                  flush=True)
        tier_stats = tierscope.stats(client)["total"]
        server_stats = server.service.stats()

    ts_ms, zarr_ms = [r[0] for r in rows], [r[1] for r in rows]
    print(f"\n{len(views)} views, every one identical to xr.open_zarr (tol=0)")
    print(f"tierscope     {_summary(ts_ms)}")
    print(f"xr.open_zarr  {_summary(zarr_ms)}")
    print(f"median ratio tierscope / open_zarr: "
          f"{statistics.median(ts_ms) / statistics.median(zarr_ms):.2f}")
    for tier in ("l1", "l2"):
        s = tier_stats[tier]
        print(f"{tier.upper()}: {s['hits']} hits, {s['misses']} misses "
              f"(hit ratio {s['hit_ratio']:.0%}), {s['blocks']} blocks held")
    p = tier_stats["prefetch"]
    print(f"prefetch: {p['issued']} tier entries issued, {p['used']} used, {p['wasted']} wasted, "
          f"{p['cancelled']} cancelled")
    print(f"server: {server_stats['origin_reads']} origin reads, "
          f"{tier_stats['fetches']} worker fetches, answered by {server_stats['served_by']}")
    return {"views": views, "tierscope_ms": ts_ms, "zarr_ms": zarr_ms, "tiers": tier_stats,
            "server": server_stats}
