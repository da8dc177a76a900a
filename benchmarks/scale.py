"""Petabyte-shaped datasets: what planning, serving, opening, viewing and evicting cost as they grow.

    python benchmarks/scale.py            # the full sweep (7-9 minutes on 2 cores shared with other work)
    python benchmarks/scale.py --quick    # fewer sizes, views and requests (about 2 minutes)
    python benchmarks/scale.py --out DIR  # where scale.png and scale.json go (default docs/img)
    python benchmarks/scale.py --only cluster  # one section (repeatable): its rows, DIR/scale-cluster.json

The grids are those of synthetic ``sample://`` datasets with 512^3-point time steps in 1 MiB blocks
(8 x 8 x 8 blocks a step), so the number of steps sets the size: 10^3 .. 10^7 blocks. Everything runs the
real parts on loopback. Measured, in this order:

1. the scheduler plugin's work per new view, without a cluster (tiers of 64 GiB, random z-slice views, on
   grids of 10^3 .. 10^7 blocks with time axes of 10 .. 10^4 steps): ``plan``, what ``_plan`` does with
   the view's observation (``Position.observe_box``, ``radius_for`` for L1 and L2, ``Position.plan``);
   ``view``, all of the plugin's work per view: the loop's snapshot of the workers (``_room``) and the
   planning thread's ``ViewPlanner.plan`` (that, plus each planned block's owner and decode flag, the
   plans made), run here in one thread;
2. ``radius_for`` per call (cold: its cache cleared; warm) for L1 = 64 GiB and a 1 x 1 x 8 x 8 view;
3. the block server's event-loop lag (a coroutine on the server's loop sleeping 1 ms and measuring its
   lateness), idle, and while 8 clients in another process send block requests carrying the largest
   position header, their views moving every request or every 64 requests; the process set up as
   ``tierscope serve`` sets its own (``run_server``: GIL switch interval 0.5 ms, start-up heap frozen;
   prefetch planning in a child process);
   then, beside those rows and not judged, the same with the clients' process at nice 19: an estimate for
   clients on other machines, whose CPU the server does not share;
4. a flood of requests, each with a new tol and a new session, against ``tierscope serve`` in its own
   process: its resident memory growth, the encodes, and the prefetch queue right after and 5 s later;
5. per grid size, with ``tierscope serve`` in its own process and one LocalCluster (2 workers x 1 thread,
   ``tierscope.connect`` with 1 GiB tiers, prefetch auto): ``xr.open_dataset``, full z-slice views at
   random time steps and z (the first view apart, then p50), and the scheduler plugin's own account of
   its work per new view (``TierscopeSchedulerPlugin.stats()``: on the scheduler's loop, ``view_cpu_s`` in
   CPU time of the loop's thread, judged against the target, and ``view_s`` in wall time; on its planning
   thread, ``plan_cpu_s`` and ``plan_s``);
6. the amortised insert into a ``distance``-policy tier of 10^2 .. 10^5 entries, the view moving every 64
   inserts.

Prints a markdown table for docs/benchmarks.md (each target, and whether it was met) and writes scale.png
and scale.json. Other work on the machine moves absolute numbers: the load average is recorded with them,
and the scheduler's work (1) and the tier inserts (6) are also measured in CPU time of the thread, which
other processes do not inflate; their targets are judged on it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import logging
import math
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Event
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEP_BLOCKS = (8, 8, 8)  # a 512^3 time step in blocks of 64^3 float32 = 1 MiB
BLOCK = (1, 64, 64, 64)
MIB, GIB = 1 << 20, 1 << 30
PLAN_TIER = 64 * GIB
LAG_PERIOD_S = 0.001
LAG_CLIENTS = 8
LAG_STEPS = 16  # time steps each lag client's view cycles through
LAG_CONDITIONS = ((1, "auto"), (64, "auto"), (64, "off"))  # (requests per view, server prefetch)
# The conditions again with the clients' process at this nice value, beside (never instead of) the rows
# above: deployed clients run on other machines, and their CPU is not the server's to share.
LAG_REMOTE_NICE = 19
FLOOD_CLIENTS = 16
FLOOD_URL = "sample://flood?shape=16,64,64,64&block=1,16,16,16&variables=u"  # 16 KiB blocks: cheap encodes
FLOOD_SETTLE_S = 5.0
INSERT_MOVE_EVERY = 64
TARGETS = {
    "open_s": 0.5,  # open_dataset at 10^7 blocks
    "plan_p99_ms": 5.0,  # scheduler work per view, at 10^4 time steps, tiers of 64 GiB
    "growth": 2.0,  # per-view work, 10^7 blocks over 10^3 blocks
    "lag_p99_ms": 5.0,
    "flood_rss_mb": 100.0,
    "flood_queued": 0,  # 5 s after the flood
    "insert_us": 50.0,  # at 10^5 entries
}


@dataclass(frozen=True)
class Sweep:
    """The sizes and repeats of one run."""

    exponents: tuple[int, ...]  # grid sizes 10^e blocks
    time_steps: tuple[int, ...]  # time axes of the planning and radius sweeps
    plan_views: int  # views timed for ``plan``
    dispatch_views: int  # views for ``view`` (all of the plugin's work per view)
    cluster_views: int  # views per grid size on the LocalCluster, the first included
    opens: int  # open_dataset calls per grid size, the first included
    lag_s: float
    flood_requests: int
    insert_entries: tuple[int, ...]
    inserts: int


FULL = Sweep(exponents=(3, 4, 5, 6, 7), time_steps=(10, 100, 1000, 10_000), plan_views=1000,
             dispatch_views=200, cluster_views=6, opens=5, lag_s=5.0, flood_requests=10_000,
             insert_entries=(100, 1000, 10_000, 100_000), inserts=20_000)
QUICK = Sweep(exponents=(3, 5, 7), time_steps=(10, 1000, 10_000), plan_views=200, dispatch_views=50,
              cluster_views=4, opens=3, lag_s=2.0, flood_requests=2000, insert_entries=(100, 10_000, 100_000),
              inserts=5000)


# ---------------------------------------------------------------------------------------------- helpers
def machine() -> dict[str, Any]:
    """The machine, named as the brief asks (``platform.processor()`` is empty on many Linux hosts)."""
    models = [line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")]
    return {"processor": platform.processor() or "".join(models[:1]), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


def source_version() -> str:
    """The commit measured, ``+dirty`` when src/ has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "src") else "")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p99, max and mean of durations in seconds, in milliseconds."""
    ms = np.asarray(seconds) * 1e3
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "mean_ms": float(ms.mean())}


def steps_for(exponent: int) -> int:
    """Time steps of the 512^3-step dataset with about 10^exponent blocks."""
    return max(1, round(10**exponent / math.prod(STEP_BLOCKS)))


def sample_url(name: str, steps: int) -> str:
    shape = ",".join(str(n) for n in (steps, *(b * s for b, s in zip(BLOCK[1:], STEP_BLOCKS, strict=True))))
    return f"sample://{name}?shape={shape}&block={','.join(map(str, BLOCK))}&variables=u"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` and its children (a server's planner and prefetch load
    processes), in MB."""
    import psutil

    server = psutil.Process(pid)
    return sum(p.memory_info().rss for p in (server, *server.children(recursive=True))) / 1e6


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------- 1. planning without a cluster
def plan_grid(blocks: int, steps: int) -> tuple[int, ...] | None:
    """A (steps, z, 8, 8) block grid of about ``blocks`` blocks (None when too few for one z-slice)."""
    y, x = STEP_BLOCKS[1:]
    z = round(blocks / (steps * y * x))
    return (steps, z, y, x) if z >= 1 else None


def _random_views(nblocks: Sequence[int], count: int, seed: int) -> list[Any]:
    """``count`` full z-slice view boxes at random time steps and z."""
    from tierscope.prefetch import Box

    rng = np.random.default_rng(seed)
    views = []
    for _ in range(count):
        t, z = int(rng.integers(nblocks[0])), int(rng.integers(nblocks[1]))
        views.append(Box((t, z, 0, 0), (t, z, nblocks[2] - 1, nblocks[3] - 1)))
    return views


def bench_planning(sweep: Sweep, seed: int = 0) -> list[dict[str, Any]]:
    """Per (time axis, grid size), random z-slice views, tiers of 64 GiB (one worker):
    - ``plan``: what the plugin's ``_plan`` does for a new view, through the public calls it makes
      (``Position.observe_box``, ``radius_for`` for L1 and L2, ``Position.plan``), over ``plan_views``;
    - ``view``: all of the plugin's work per new view (the loop's ``_room`` on a stub scheduler, then the
      planning thread's ``ViewPlanner.plan``: the above, plus each planned block's owner and decode flag,
      and the plans made), over ``dispatch_views``."""
    from tierscope.client.source import Source
    from tierscope.dask.scheduler import TierscopeSchedulerPlugin, View, ViewPlanner
    from tierscope.dask.tiers import BlockSpec
    from tierscope.grid import BlockGrid
    from tierscope.prefetch import Position, radius_for

    worker = "tcp://127.0.0.1:1"
    scheduler = SimpleNamespace(  # one worker with no tier metrics yet: configured sizes, no L2 average
        workers={worker: SimpleNamespace(metrics={}, memory_limit=2 * PLAN_TIER)})
    rows = []
    for steps, exponent in itertools.product(sweep.time_steps, sweep.exponents):
        nblocks = plan_grid(10**exponent, steps)
        if nblocks is None:
            continue
        grid = BlockGrid(tuple(n * b for n, b in zip(nblocks, BLOCK, strict=True)), BLOCK)
        plugin = TierscopeSchedulerPlugin(prefetch="auto", l1=PLAN_TIER, l2=PLAN_TIER, equipped=[worker])
        pos, wall, cpu, planned = Position(grid, 0), [], [], 0
        for box in _random_views(nblocks, sweep.plan_views, seed):
            started, cpu_started = time.perf_counter(), time.thread_time()
            if pos.observe_box(box):
                r1, r2 = (radius_for(grid, PLAN_TIER, float(MIB), 0, view=pos.box.extents) for _ in "12")
                planned += len(pos.plan(plugin.mode, max(r1, r2), limit=plugin.max_plan))
            wall.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - cpu_started)
        spec = BlockSpec(Source.parse("http://127.0.0.1:1/datasets/plan"), "u", 1e-3, grid, "float32")
        planner, view_wall, view_cpu = ViewPlanner(plugin.mode), [], []
        for box in _random_views(nblocks, sweep.dispatch_views, seed + 1):
            started, cpu_started = time.perf_counter(), time.thread_time()
            planner.plan(View("client", spec, box, plugin._room(scheduler, spec, [worker])))
            view_wall.append(time.perf_counter() - started)
            view_cpu.append(time.thread_time() - cpu_started)
        rows.append({"time_steps": steps, "blocks": math.prod(nblocks), "grid": nblocks,
                     "planned_per_view": planned / len(wall), "plan": summary_ms(wall),
                     "plan_cpu": summary_ms(cpu), "view": summary_ms(view_wall),
                     "view_cpu": summary_ms(view_cpu)})
        log(f"planning: {steps} steps, {math.prod(nblocks):.2e} blocks: p99 CPU: plan "
            f"{rows[-1]['plan_cpu']['p99_ms']:.2f} ms, whole view {rows[-1]['view_cpu']['p99_ms']:.2f} ms")
    return rows


# ------------------------------------------------------------------------------- 2. radius_for
def bench_radius(sweep: Sweep, cold_repeats: int = 20, warm_calls: int = 10_000) -> list[dict[str, Any]]:
    """``radius_for`` per call for L1 = 64 GiB and a 1 x 1 x 8 x 8 view: cold (cache cleared) and warm."""
    from tierscope import prefetch
    from tierscope.grid import BlockGrid

    rows = []
    for steps in sweep.time_steps:
        grid = BlockGrid((steps, *(b * s for b, s in zip(BLOCK[1:], STEP_BLOCKS, strict=True))), BLOCK)

        def call(grid: BlockGrid = grid) -> int:
            return prefetch.radius_for(grid, PLAN_TIER, float(MIB), 0, view=(1, 1, 8, 8))

        cold = []
        for _ in range(cold_repeats):
            prefetch._radius.cache_clear()
            started = time.perf_counter()
            radius = call()
            cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(warm_calls):
            call()
        warm = (time.perf_counter() - started) / warm_calls
        rows.append({"time_steps": steps, "blocks": math.prod(grid.nblocks), "radius": radius,
                     "cold_us": statistics.median(cold) * 1e6, "cold_max_us": max(cold) * 1e6,
                     "warm_us": warm * 1e6})
        log(f"radius_for: {steps} steps: cold {rows[-1]['cold_us']:.0f} us, warm {warm * 1e6:.1f} us")
    return rows


# ----------------------------------------------------------------------- 3. server event-loop lag
async def _probe(seconds: float) -> dict[str, Any]:
    """Lateness of a 1 ms sleep on the running loop, repeated for ``seconds``; and the share of those
    seconds the loop's thread spent on a CPU (its own work: the rest of any lateness is waiting for one)."""
    lags, cpu, started = [], time.thread_time(), time.perf_counter()
    while time.perf_counter() - started < seconds:
        slept = time.perf_counter()
        await asyncio.sleep(LAG_PERIOD_S)
        lags.append(time.perf_counter() - slept - LAG_PERIOD_S)
    cpu_share = (time.thread_time() - cpu) / (time.perf_counter() - started)
    return {**summary_ms(lags), "loop_cpu_share": cpu_share}


def lag_headers(client: int, nblocks: Sequence[int]) -> list[dict[str, str]]:
    """A lag client's views (z-slice ``client`` at steps 0..LAG_STEPS-1) as request headers: its session
    and the view's blocks, as many as the protocol allows, in the position header."""
    from tierscope.client.http import view_headers
    from tierscope.server.service import MAX_POSITION_BLOCKS

    z = client % nblocks[1]
    views = []
    for t in range(LAG_STEPS):
        slab = itertools.product([t], range(z, nblocks[1]), range(nblocks[2]), range(nblocks[3]))
        views.append(view_headers(f"lag-{client}", list(itertools.islice(slab, MAX_POSITION_BLOCKS))))
    return views


async def _lag_client(http: aiohttp.ClientSession, url: str, client: int, nblocks: Sequence[int],
                      per_view: int, end: float) -> int:
    """One client until time ``end``: the same (warm) block over and over, its position header moving to
    the next view every ``per_view`` requests. The requests sent."""
    views, requests = itertools.cycle(lag_headers(client, nblocks)), 0
    block = f"{url}/blocks/u/0.{client % nblocks[1]}.0.0"
    while time.perf_counter() < end:
        if requests % per_view == 0:
            headers = next(views)
        async with http.get(block, params={"tol": "0.001"}, headers=headers) as r:
            r.raise_for_status()
            await r.read()
        requests += 1
    return requests


async def _lag_clients(url: str, nblocks: Sequence[int], per_view: int, seconds: float, ready: Event) -> int:
    """Each client's block once (warm), then ``seconds`` of requests from all clients; the requests sent."""
    async with aiohttp.ClientSession() as http:
        for c in range(LAG_CLIENTS):
            await _lag_client(http, url, c, nblocks, 1, 0.0)
        ready.set()
        end = time.perf_counter() + seconds
        counts = await asyncio.gather(*(_lag_client(http, url, c, nblocks, per_view, end)
                                        for c in range(LAG_CLIENTS)))
    return sum(counts)


def run_lag_clients(url: str, nblocks: Sequence[int], per_view: int, seconds: float, ready: Event,
                    sent: Any, nice: int = 0) -> None:
    """The lag clients' process: its own interpreter and loop, like users' notebooks on other machines;
    ``nice``: as much nicer than the server (a free CPU goes to the server first, as if elsewhere)."""
    os.nice(nice)
    sent.put(asyncio.run(_lag_clients(url, nblocks, per_view, seconds, ready)))


def _loaded_lag(server: Any, nblocks: Sequence[int], per_view: int, seconds: float,
                nice: int = 0) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    ready, sent = ctx.Event(), ctx.Queue()
    clients = ctx.Process(target=run_lag_clients, args=(f"{server.url}/datasets/lag", nblocks, per_view,
                                                        seconds + 1.0, ready, sent, nice))
    clients.start()
    while not ready.wait(timeout=0.5):
        if not clients.is_alive():
            raise RuntimeError(f"the lag clients exited with {clients.exitcode} before they started")
    lag = asyncio.run_coroutine_threadsafe(_probe(seconds), server._loop).result()
    requests = sent.get(timeout=120)
    clients.join(timeout=30)
    return {"requests_per_view": per_view, "clients_nice": nice, "requests_per_s": requests / (seconds + 1.0),
            **lag, "load_average": os.getloadavg()[0]}


def bench_loop_lag(sweep: Sweep) -> dict[str, Any]:
    """Server loop lag idle, then under 8 clients whose views move every request (a prefetch plan per
    request: the worst case) and every 64 requests (a z-slice's blocks per view); the latter again with
    server prefetch off, which leaves the loop only the requests' own work (headers, positions). Then the
    same with the clients at nice ``LAG_REMOTE_NICE``, as an estimate for clients on other machines."""
    from tierscope.server import BlockService, ServerThread
    from tierscope.server.app import freeze_heap
    from tierscope.server.service import GIL_SWITCH_S, MAX_POSITION_BLOCKS
    from tierscope.store.origin import open_origin

    interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_S)  # as `tierscope serve` sets its process's (run_server); until the end
    origin = open_origin(sample_url("lag", steps_for(max(sweep.exponents))))
    nblocks = origin.info().variable("u").grid.nblocks
    # planning and prefetch loads in child processes, as `tierscope serve` does by default (serve.planner,
    # serve.prefetch_loads)
    service = BlockService([origin], l3="256MiB", l4="512MiB", prefetch="auto", planner="process",
                           prefetch_loads="process")
    loaded = []
    with ServerThread(service) as server:
        freeze_heap()  # as run_server does once its app is made; unfrozen at the end
        idle = {**asyncio.run_coroutine_threadsafe(_probe(min(sweep.lag_s, 2.0)), server._loop).result(),
                "load_average": os.getloadavg()[0]}
        for nice, (per_view, prefetch) in itertools.product((0, LAG_REMOTE_NICE), LAG_CONDITIONS):
            asyncio.run_coroutine_threadsafe(service.configure(prefetch=prefetch), server._loop).result()
            loaded.append({"prefetch": prefetch, **_loaded_lag(server, nblocks, per_view, sweep.lag_s, nice)})
    sys.setswitchinterval(interval)
    gc.unfreeze()
    result = {"blocks": math.prod(nblocks), "clients": LAG_CLIENTS, "seconds": sweep.lag_s,
              "position_blocks": MAX_POSITION_BLOCKS, "idle": idle, "loaded": loaded}
    log(f"loop lag: idle p99 {idle['p99_ms']:.2f} ms; loaded p99 " + ", ".join(
        f"{r['p99_ms']:.2f} ms ({r['requests_per_s']:.0f} req/s, {r['requests_per_view']} per view, prefetch "
        f"{r['prefetch']}{', clients nice ' + str(r['clients_nice']) if r['clients_nice'] else ''})"
        for r in loaded))
    return result


# --------------------------------------------------------------------------- 4. distinct-tol flood
def start_server(urls: Sequence[str], port: int, l3: str, l4: str) -> subprocess.Popen[str]:
    """``tierscope serve`` of ``urls`` in its own process (prefetch on), up and answering."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierscope.cli", "serve", *urls, "--port", str(port), "--l3", l3, "--l4", l4,
         "--prefetch", "on"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    proc.stdout.readline()  # "serving http://..."
    deadline = time.monotonic() + 60
    while True:
        try:
            get_json(f"http://127.0.0.1:{port}/datasets")
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("tierscope serve did not come up") from None
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)


async def _flood(url: str, nblocks: Sequence[int], requests: int) -> int:
    """``requests`` block requests, each with a new tol and session, FLOOD_CLIENTS at a time; failures."""
    numbers, rng, failures = iter(range(requests)), np.random.default_rng(1), 0

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal failures
        for i in numbers:
            index = ".".join(str(int(rng.integers(n))) for n in nblocks)
            params = {"tol": repr(1e-4 * (1 + i * 1e-6))}
            async with http.get(f"{url}/blocks/u/{index}", params=params,
                                headers={"X-Tierscope-Session": f"flood-{i}"}) as r:
                await r.read()
                failures += r.status != 200

    connector = aiohttp.TCPConnector(limit=FLOOD_CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(http) for _ in range(FLOOD_CLIENTS)))
    return failures


def _flood_point(base: str, pid: int) -> dict[str, Any]:
    stats = get_json(f"{base}/stats")
    return {"rss_mb": rss_mb(pid), "encodes": stats["encodes"], "queued": stats["prefetch"]["queued"],
            "expired": stats["prefetch"]["expired"], "sessions": stats["sessions"],
            "tiers_mb": sum(t["nbytes"] for t in stats["tiers"].values()) / 1e6}


def bench_flood(sweep: Sweep) -> dict[str, Any]:
    """RSS growth, encodes and prefetch queue of a server flooded with distinct tols and sessions."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server([FLOOD_URL], port, "256MiB", "256MiB")
    try:
        info = get_json(f"{base}/datasets/flood")["variables"]["u"]
        nblocks = [-(-n // b) for n, b in zip(info["shape"], info["block"], strict=True)]
        asyncio.run(_flood(f"{base}/datasets/flood", nblocks, FLOOD_CLIENTS))  # imports, pools, first tiles
        time.sleep(1.0)
        before = _flood_point(base, proc.pid)
        started = time.perf_counter()
        failures = asyncio.run(_flood(f"{base}/datasets/flood", nblocks, sweep.flood_requests))
        elapsed = time.perf_counter() - started
        after = _flood_point(base, proc.pid)
        time.sleep(FLOOD_SETTLE_S)
        settled = _flood_point(base, proc.pid)
    finally:
        stop_server(proc)
    growth = {point: p["rss_mb"] - before["rss_mb"] for point, p in (("after", after), ("settled", settled))}
    beyond = {point: growth[point] - (p["tiers_mb"] - before["tiers_mb"])
              for point, p in (("after", after), ("settled", settled))}
    result = {"requests": sweep.flood_requests, "clients": FLOOD_CLIENTS, "failures": failures,
              "seconds": elapsed, "before": before, "after": after, "settled": settled,
              "rss_growth_mb": max(growth.values()), "rss_growth_beyond_tiers_mb": max(beyond.values())}
    log(f"flood: RSS +{result['rss_growth_mb']:.0f} MB, queued {after['queued']} -> {settled['queued']}")
    return result


# ------------------------------------------------------------------------ 5. the cluster, per size
async def _scheduler_stats(dask_scheduler: Any) -> dict[str, Any]:
    """The plugin's stats once its planning thread has handed back every view."""
    from tierscope.dask.scheduler import SCHEDULER_PLUGIN_NAME

    plugin = dask_scheduler.plugins[SCHEDULER_PLUGIN_NAME]
    await plugin.settled()
    return plugin.stats()


def _reset_scheduler_stats(dask_scheduler: Any) -> None:
    from tierscope.dask.scheduler import SCHEDULER_PLUGIN_NAME

    dask_scheduler.plugins[SCHEDULER_PLUGIN_NAME].reset_stats()


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn``'s result and the seconds it took."""
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - started


def _z_slice(ds: Any, t: int, z: int) -> np.ndarray:
    return ds.u.isel(time=t, z=z).values


def _timed_views(ds: Any, count: int, rng: np.random.Generator) -> list[float]:
    """Seconds of ``count`` full z-slice views at random time steps and z."""
    return [timed(_z_slice, ds, int(rng.integers(ds.sizes["time"])), int(rng.integers(ds.sizes["z"])))[1]
            for _ in range(count)]


def bench_cluster(sweep: Sweep, seed: int = 2) -> list[dict[str, Any]]:
    """Per grid size, against ``tierscope serve`` in its own process (as on a separate machine, it shares
    no GIL with the scheduler): open_dataset, z-slice views on one LocalCluster, the scheduler's work per
    new view."""
    import xarray as xr
    from distributed import Client, LocalCluster

    import tierscope

    names = {e: f"g{e}" for e in sweep.exponents}
    port, rows, rng = free_port(), [], np.random.default_rng(seed)
    urls = [sample_url(names[e], steps_for(e)) for e in sweep.exponents]
    server = start_server(urls, port, "256MiB", "512MiB")
    try:
        with (LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR) as cluster,
              Client(cluster) as client):
            tierscope.connect(client, l1="1GiB", l2="1GiB", prefetch="auto")
            for exponent in sweep.exponents:
                url = f"http://127.0.0.1:{port}/datasets/{names[exponent]}"
                opens = [timed(xr.open_dataset, url, engine="tierscope", tol=1e-3)
                         for _ in range(sweep.opens)]
                ds = opens[0][0]
                client.run_on_scheduler(_reset_scheduler_stats)
                views = _timed_views(ds, sweep.cluster_views, rng)
                scheduler = client.run_on_scheduler(_scheduler_stats)
                rows.append({"blocks": math.prod(-(-n // b) for n, b in zip(ds.u.shape, BLOCK, strict=True)),
                             "time_steps": ds.sizes["time"], "open_first_s": opens[0][1],
                             "open_s": statistics.median(s for _, s in opens[1:]), "first_view_s": views[0],
                             "view": summary_ms(views[1:]), "scheduler_view": scheduler["view_s"],
                             "scheduler_view_cpu": scheduler["view_cpu_s"],
                             "scheduler_plan": scheduler["plan_s"], "scheduler_plan_cpu": scheduler["plan_cpu_s"],
                             "load_average": os.getloadavg()[0]})
                row = rows[-1]
                log(f"cluster: {row['blocks']:.2e} blocks: open {row['open_s'] * 1e3:.0f} ms, first view "
                    f"{views[0]:.2f} s, view p50 {row['view']['p50_ms']:.0f} ms, scheduler p99 "
                    f"{scheduler['view_cpu_s']['p99_ms']:.2f} ms CPU ({scheduler['view_s']['p99_ms']:.2f} wall), "
                    f"planning thread p99 {scheduler['plan_cpu_s']['p99_ms']:.2f} ms CPU "
                    f"({scheduler['plan_s']['p99_ms']:.2f} wall)")
    finally:
        stop_server(server)
    return rows


# ------------------------------------------------------------------------------- 6. tier inserts
def _playback_tier(entries: int, inserts: int) -> dict[str, Any]:
    """A full ``distance`` tier of ``entries`` entries and ``inserts`` more inserts (each evicting one),
    playback-like: block after block of a (10^6, 8, 8, 8) grid in C order, the view moving to the next
    z-slice (the 64 blocks just inserted) every 64 inserts, so each move re-ranks the whole tier once."""
    from tierscope.cache import TierCache, Views

    grid = (10**6, *STEP_BLOCKS)
    keys = [tuple(k) for k in np.stack(np.unravel_index(np.arange(entries + inserts), grid), axis=1).tolist()]
    views: dict[str, Views] = {}
    tier: TierCache[bytes] = TierCache(GIB, "bench", policy="distance")
    tier.set_distance(lambda key: ("u", key), views.get)

    def insert(i: int) -> None:
        if i % INSERT_MOVE_EVERY == 0:
            t, z = keys[i][:2]
            views["u"] = Views([((t, z, 0, 0), (t, z, STEP_BLOCKS[1] - 1, STEP_BLOCKS[2] - 1))])
            tier.moved("u")
        tier.get_or_load(keys[i], bytes)

    insert(0)
    tier.reconfigure(capacity=entries * tier.size)  # exactly ``entries`` entries fit
    for i in range(1, entries):
        insert(i)
    started, cpu_started = time.perf_counter(), time.thread_time()
    for i in range(entries, entries + inserts):
        insert(i)
    wall, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
    if len(tier) != entries or tier.stats.evictions != inserts:
        raise RuntimeError(f"the tier held {len(tier)} entries after {tier.stats.evictions} evictions")
    return {"entries": entries, "inserts": inserts, "insert_us": wall / inserts * 1e6,
            "insert_cpu_us": cpu / inserts * 1e6, **tier.rank_stats}


def bench_inserts(sweep: Sweep) -> list[dict[str, Any]]:
    """Amortised insert into a ``distance`` tier of each size (``_playback_tier``)."""
    rows = []
    for entries in sweep.insert_entries:
        rows.append(_playback_tier(entries, sweep.inserts))
        log(f"tier inserts: {entries:,} entries: {rows[-1]['insert_cpu_us']:.1f} us CPU per insert")
    return rows


# ------------------------------------------------------------------------------------ reporting
Row = tuple[str, str, str, str, bool | None]  # cost, size, measured, target, met (None: no target here)


def _blocks(n: int) -> str:
    return f"{n:,} blocks"


def _ms(summary: dict[str, float], digits: int = 2) -> str:
    return f"{summary['p50_ms']:.{digits}f}; {summary['p99_ms']:.{digits}f} ms"


def _cluster_rows(cluster: list[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    for r in cluster:
        top = r is cluster[-1]
        rows.append(("`xr.open_dataset`: median; first", _blocks(r["blocks"]),
                     f"{r['open_s'] * 1e3:.0f}; {r['open_first_s'] * 1e3:.0f} ms",
                     "< 500 ms at 10^7" if top else "", r["open_s"] < TARGETS["open_s"] if top else None))
    for r in cluster:
        rows.append(("z-slice view, LocalCluster: first; p50", _blocks(r["blocks"]),
                     (f"{r['first_view_s'] * 1e3:.0f}; {r['view']['p50_ms']:.0f} ms "
                      f"({r['view']['n']} + 1 views)"),
                     "", None))
    for r in cluster:
        top = r is cluster[-1]
        cpu = r["scheduler_view_cpu"]
        rows.append(("scheduler work per new view, LocalCluster: CPU p50; p99 (`view_cpu_s`; wall `view_s`)",
                     _blocks(r["blocks"]), f"{_ms(cpu)} ({_ms(r['scheduler_view'])}; {cpu['count']} views)",
                     "CPU p99 <= 5 ms" if top else "", cpu["p99_ms"] <= TARGETS["plan_p99_ms"] if top else None))
    for r in cluster:
        plan = r["scheduler_plan_cpu"]
        rows.append(("scheduler planning thread per new view, LocalCluster: CPU p50; p99 (`plan_cpu_s`; wall "
                     "`plan_s`)", _blocks(r["blocks"]),
                     f"{_ms(plan)} ({_ms(r['scheduler_plan'])}; {plan['count']} views)", "", None))
    growth = cluster[-1]["scheduler_view_cpu"]["p50_ms"] / cluster[0]["scheduler_view_cpu"]["p50_ms"]
    rows.append(("scheduler work per new view, LocalCluster: growth of CPU p50",
                 f"{_blocks(cluster[-1]['blocks'])} / {_blocks(cluster[0]['blocks'])}", f"{growth:.2f}x",
                 "<= 2x", growth <= TARGETS["growth"]))
    return rows


def _planning_rows(planning: list[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    for what, label in (("plan", "observe + `_plan`"), ("view", "whole view (`_room` + `ViewPlanner.plan`)")):
        for r in planning:
            at_target = r["time_steps"] >= 10_000
            cpu = r[f"{what}_cpu"]
            rows.append((f"scheduler, no cluster, 64 GiB tiers, {label}: CPU p50; p99 (wall p50; p99)",
                         f"{r['time_steps']:,} steps, {_blocks(r['blocks'])}", f"{_ms(cpu)} ({_ms(r[what])})",
                         "CPU p99 <= 5 ms" if at_target else "",
                         cpu["p99_ms"] <= TARGETS["plan_p99_ms"] if at_target else None))
        for steps in sorted({r["time_steps"] for r in planning}):
            same = [r for r in planning if r["time_steps"] == steps]
            if len(same) > 1:
                growth = same[-1][f"{what}_cpu"]["p99_ms"] / same[0][f"{what}_cpu"]["p99_ms"]
                rows.append((f"scheduler, no cluster, {label}: growth of CPU p99",
                             f"{steps:,} steps, {_blocks(same[-1]['blocks'])} / {_blocks(same[0]['blocks'])}",
                             f"{growth:.2f}x", "<= 2x", growth <= TARGETS["growth"]))
    return rows


def _lag_rows(lag: dict[str, Any]) -> list[Row]:
    idle = lag["idle"]
    rows: list[Row] = [("server loop lag: p50; p99; max", "no clients",
                        f"{_ms(idle)}; {idle['max_ms']:.1f} ms", "", None)]
    for r in lag["loaded"]:
        remote = r["clients_nice"] > 0  # an estimate beside the measured rows: not judged
        size = (f"{lag['clients']} clients, {lag['position_blocks']}-block position, view moves every "
                f"{r['requests_per_view']} requests, prefetch {r['prefetch']}: {r['requests_per_s']:.0f} "
                f"req/s, loop thread on a CPU {r['loop_cpu_share']:.0%} of the time")
        if remote:
            size = (f"estimate for clients on other machines: the clients' process at nice "
                    f"{r['clients_nice']}; {size}")
        rows.append(("server loop lag: p50; p99; max", size, f"{_ms(r)}; {r['max_ms']:.1f} ms",
                     "" if remote else "p99 <= 5 ms", None if remote else r["p99_ms"] <= TARGETS["lag_p99_ms"]))
    return rows


def _flood_rows(flood: dict[str, Any]) -> list[Row]:
    size = f"{flood['requests']:,} requests, each a new tol and session"
    before, after, settled = flood["before"], flood["after"], flood["settled"]
    return [
        ("flood: server RSS growth; beyond what L3 + L4 took on", size,
         (f"{flood['rss_growth_mb']:.0f}; {flood['rss_growth_beyond_tiers_mb']:.0f} MB (L3 + L4 hold "
          f"{settled['tiers_mb']:.0f} MB)"), "< 100 MB", flood["rss_growth_mb"] < TARGETS["flood_rss_mb"]),
        ("flood: encodes; sessions kept", size,
         f"{after['encodes'] - before['encodes']:,}; {after['sessions']:,}", "", None),
        ("flood: prefetch queued right after; 5 s after", size,
         f"{after['queued']:,}; {settled['queued']:,} (expired {settled['expired']:,})", "0 after 5 s",
         settled["queued"] == TARGETS["flood_queued"]),
    ]


def markdown(results: dict[str, Any]) -> str:
    """The summary table: each cost at each size, with its target and whether it was met."""
    rows: list[Row] = []
    if "cluster" in results:
        rows += _cluster_rows(results["cluster"])
    if "planning" in results:
        rows += _planning_rows(results["planning"])
    rows += [("`radius_for`, L1 64 GiB, view 1x1x8x8: cold; warm", f"{r['time_steps']:,} steps",
              f"{r['cold_us']:.0f}; {r['warm_us']:.1f} us (radius {r['radius']})", "", None)
             for r in results.get("radius", ())]
    if "loop_lag" in results:
        rows += _lag_rows(results["loop_lag"])
    if "flood" in results:
        rows += _flood_rows(results["flood"])
    for r in results.get("inserts", ()):
        at_target = r["entries"] >= 10**5
        rows.append(("tier insert, `distance` policy, view moves every 64 inserts: CPU (wall)",
                     f"{r['entries']:,} entries", f"{r['insert_cpu_us']:.1f} ({r['insert_us']:.1f}) us",
                     "CPU <= 50 us at 10^5" if at_target else "",
                     r["insert_cpu_us"] <= TARGETS["insert_us"] if at_target else None))
    lines = ["| cost | size | measured | target | met |", "|---|---|---|---|---|"]
    marks = {None: "", True: "yes", False: "**no**"}
    lines += [f"| {cost} | {size} | {value} | {target} | {marks[met]} |"
              for cost, size, value, target, met in rows]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    """Cost against size, one panel per cost, log-log; targets dotted."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend is left alone

    fig = Figure(figsize=(20, 8.5))
    axes = fig.subplots(2, 4)
    m = results["machine"]
    fig.suptitle(f"tierscope at scale: cost against size ({m['processor']}, {m['cpu_count']} cores)")
    cluster = results["cluster"]
    blocks = [r["blocks"] for r in cluster]

    ax = axes[0][0]
    ax.plot(blocks, [r["open_s"] * 1e3 for r in cluster], "o-", label="median")
    ax.plot(blocks, [r["open_first_s"] * 1e3 for r in cluster], "s--", label="first")
    ax.axhline(TARGETS["open_s"] * 1e3, color="grey", ls=":", label="target")
    _axes(ax, "xr.open_dataset", "grid blocks", "ms")

    ax = axes[0][1]
    ax.plot(blocks, [r["first_view_s"] * 1e3 for r in cluster], "s--", label="first view")
    ax.plot(blocks, [r["view"]["p50_ms"] for r in cluster], "o-", label="view p50")
    _axes(ax, "full z-slice view, LocalCluster, prefetch auto", "grid blocks", "ms")

    ax = axes[0][2]
    planning = results["planning"]
    for steps in sorted({r["time_steps"] for r in planning}):
        same = [r for r in planning if r["time_steps"] == steps]
        line = ax.plot([r["blocks"] for r in same], [r["plan_cpu"]["p99_ms"] for r in same], "o-",
                       label=f"plan, {steps:,} steps")
        ax.plot([r["blocks"] for r in same], [r["view_cpu"]["p99_ms"] for r in same], "s--",
                color=line[0].get_color(), label=f"whole view, {steps:,} steps")
    ax.plot(blocks, [r["scheduler_view"]["p99_ms"] for r in cluster], "k^:",
            label="LocalCluster view_s (wall)")
    ax.plot(blocks, [r["scheduler_view_cpu"]["p99_ms"] for r in cluster], "kv-",
            label="LocalCluster view_cpu_s")
    ax.plot(blocks, [r["scheduler_plan_cpu"]["p99_ms"] for r in cluster], "kd--",
            label="LocalCluster plan_cpu_s (planning thread)")
    ax.axhline(TARGETS["plan_p99_ms"], color="grey", ls=":", label="target")
    _axes(ax, "scheduler work per new view, p99 (CPU, 64 GiB tiers)", "grid blocks", "ms")

    ax = axes[1][0]
    radius = results["radius"]
    ax.plot([r["time_steps"] for r in radius], [r["cold_us"] for r in radius], "o-", label="cold")
    ax.plot([r["time_steps"] for r in radius], [r["warm_us"] for r in radius], "s--", label="warm")
    _axes(ax, "radius_for, L1 64 GiB", "time steps", "us per call")

    ax = axes[0][3]
    inserts = results["inserts"]
    ax.plot([r["entries"] for r in inserts], [r["insert_cpu_us"] for r in inserts], "o-", label="CPU")
    ax.plot([r["entries"] for r in inserts], [r["insert_us"] for r in inserts], "s--", label="wall")
    ax.axhline(TARGETS["insert_us"], color="grey", ls=":", label="target")
    _axes(ax, "distance-policy tier insert, view moves every 64", "entries", "us")

    _lag_panel(axes[1][1], results["loop_lag"])
    _flood_panel(axes[1][2], results["flood"])
    axes[1][3].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _lag_panel(ax: Any, lag: dict[str, Any]) -> None:
    stats = ("p50_ms", "p99_ms", "max_ms")
    conditions = [("idle", lag["idle"])] + [
        (f"every {r['requests_per_view']} req, prefetch {r['prefetch']}"
         f"{', clients nice ' + str(r['clients_nice']) if r['clients_nice'] else ''}", r) for r in lag["loaded"]]
    width = 0.8 / len(conditions)
    for i, (label, row) in enumerate(conditions):
        ax.bar(np.arange(3) + (i - (len(conditions) - 1) / 2) * width, [max(row[s], 1e-3) for s in stats],
               width=width, label=label)
    ax.set_xticks(range(3), [s.removesuffix("_ms") for s in stats])
    ax.axhline(TARGETS["lag_p99_ms"], color="grey", ls=":", label="target (p99)")
    ax.set_yscale("log")
    ax.set_title(f"server loop lag, {lag['clients']} clients, view moves ...")
    ax.set_ylabel("ms")
    ax.set_ylim(top=ax.get_ylim()[1] * 30)  # room above the bars for the legend
    ax.legend(fontsize=6, ncol=2, loc="upper left")


def _flood_panel(ax: Any, flood: dict[str, Any]) -> None:
    points = [("before", flood["before"]), ("right after", flood["after"]), ("5 s after", flood["settled"])]
    x = range(len(points))
    ax.bar(x, [p["rss_mb"] - flood["before"]["rss_mb"] for _, p in points], color="#7570b3",
           label="RSS growth (MB)")
    ax.plot(x, [p["tiers_mb"] for _, p in points], "ko", label="L3 + L4 held (MB)")
    ax.axhline(TARGETS["flood_rss_mb"], color="grey", ls=":", label="target")
    ax.set_xticks(list(x), [label for label, _ in points])
    ax.set_title(f"{flood['requests']:,} requests, each a new tol and session")
    ax.set_ylabel("MB")
    ax.legend(fontsize=8)


def _axes(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)

SECTIONS: dict[str, Callable[[Sweep], Any]] = {
    "planning": bench_planning, "radius": bench_radius, "loop_lag": bench_loop_lag, "flood": bench_flood,
    "cluster": bench_cluster, "inserts": bench_inserts}


SECTIONS: dict[str, Callable[[Sweep], Any]] = {
    "planning": bench_planning, "radius": bench_radius, "loop_lag": bench_loop_lag, "flood": bench_flood,
    "cluster": bench_cluster, "inserts": bench_inserts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, views and requests")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where scale.png/.json go")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (repeatable; one of {', '.join(SECTIONS)}); no plot")
    args = parser.parse_args()
    sweep = QUICK if args.quick else FULL
    logging.getLogger("distributed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", "Port .* is already in use")  # the scheduler's HTTP port: any will do
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "source": source_version(), "sweep": asdict(sweep),
                               "targets": TARGETS, "load_average_before": os.getloadavg()[0]}
    log(f"machine: {results['machine']}")
    results["section_seconds"] = {}
    for name, bench in SECTIONS.items():
        if not args.only or name in args.only:
            results[name], results["section_seconds"][name] = timed(bench, sweep)
    results["seconds"] = time.perf_counter() - started
    results["load_average_after"] = os.getloadavg()[0]
    numbers = args.out / (f"scale-{'-'.join(args.only)}.json" if args.only else "scale.json")
    numbers.write_text(json.dumps(results, indent=1))  # a section alone never replaces the full run's
    png = None if args.only else plot(results, args.out / "scale.png")
    m = results["machine"]
    print(f"Machine: {m['processor']} ({m['machine']}), {m['cpu_count']} cores, Python {m['python']}; "
          f"`python benchmarks/scale.py{' --quick' if args.quick else ''}"
          f"{''.join(f' --only {o}' for o in args.only or ())}` at {results['source']}, "
          f"{results['seconds']:.0f} s; load average {results['load_average_before']:.1f} before the run, "
          f"{results['load_average_after']:.1f} after (other work shares the cores).\n")
    print(markdown(results))
    print(f"\nplot: {png}\nnumbers: {numbers}")



if __name__ == "__main__":
    main()
