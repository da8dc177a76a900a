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


PHASES = {
    "scrub time": "scrub time forward at the middle z, as a time slider does",
    "scrub back": "scrub back to the first step",
    "move z": "move through z at the first step, a fraction of a block at a time",
}


def _row(name: str, ms: list[float]) -> str:
    arr = np.asarray(ms)
    return (f"  {name:<13} {arr.mean():8.1f} {np.percentile(arr, 50):8.1f} {np.percentile(arr, 95):8.1f}"
            f" {arr[0]:8.1f}")


def _report(views: list[tuple[str, int, int]], ts_ms: list[float], zarr_ms: list[float],
            tiers: dict, server: dict) -> None:
    """The closing report: what was measured, in words, with the numbers that say it."""
    print(f"\n{len(views)} views, every one identical to xr.open_zarr (tol=0)")
    print("\nmilliseconds per view, lower is better:")
    print(f"  {'':<13} {'mean':>8} {'p50':>8} {'p95':>8} {'first':>8}")
    print(_row("tierscope", ts_ms))
    print(_row("xr.open_zarr", zarr_ms))
    ratio = statistics.median(ts_ms) / statistics.median(zarr_ms)
    print(f"  a typical (median) view took {ratio:.2f}x the time of xr.open_zarr")
    l1, l2 = tiers["l1"], tiers["l2"]
    loads = l1["hits"] + l1["misses"]
    print(f"\nthe views loaded {loads} blocks; each was found")
    print(f"  {l1['hits']:>5} already decoded in its worker's memory (L1, {l1['hit_ratio']:.0%} of the loads)")
    print(f"  {l2['hits']:>5} as an encoded copy in its worker's memory (L2), so only decoded")
    print(f"  {l2['misses']:>5} nowhere on the workers: fetched from the block server while the view waited")
    p = tiers["prefetch"]
    print(f"prefetch (blocks loaded while you looked at the previous view): {p['blocks']} loaded, "
          f"{p['used']} of them then viewed, {p['wasted']} evicted before any view used them")
    by = server["served_by"]
    print(f"block server: {server['origin_reads']} blocks read from the store, its own prefetch included; "
          f"requests answered from its encoded cache (L3) {by['l3']}, raw cache (L4) {by['l4']}, "
          f"the store {by['origin']}")


def _plot(path: Path, views: list[tuple[str, int, int]], ts_ms: list[float], zarr_ms: list[float]) -> None:
    """Per-view latency of both, saved as a PNG next to the sample (only with matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(8, 3.5))
    ax = fig.add_subplot()
    ax.plot(ts_ms, label="tierscope", color="#1b9e77")
    ax.plot(zarr_ms, label="xr.open_zarr", color="#d95f02")
    for i, (phase, _, _) in enumerate(views):
        if i and views[i - 1][0] != phase:
            ax.axvline(i - 0.5, color="#999999", lw=0.8)
    ax.set(xlabel="view (phases: scrub time, scrub back, move z)", ylabel="ms per view (lower is better)",
           yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


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
        print(f"tierscope demo: variable u (x-velocity) of a {' x '.join(map(str, shape))} (time, z, y, x) "
              f"sample, one z-slice per view,\nthrough a block server ({url}) and a LocalCluster of "
              f"{workers} workers, next to the same views through xr.open_zarr.")
        phases = dict.fromkeys(phase for phase, _, _ in views)
        for n, phase in enumerate(phases, 1):
            count = sum(v[0] == phase for v in views)
            print(f"  phase {n}, {phase}: {PHASES[phase]} ({count} views)")
        print("each line: the view, and its milliseconds through each (lower is better)", flush=True)
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
    _report(views, ts_ms, zarr_ms, tier_stats, server_stats)
    _plot(store.parent / "demo.png", views, ts_ms, zarr_ms)
    return {"views": views, "tierscope_ms": ts_ms, "zarr_ms": zarr_ms, "tiers": tier_stats,
            "server": server_stats}
