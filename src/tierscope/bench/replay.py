"""Replay saved access sequences against every system in one run, and summarise what each view cost.

Loops, outermost first: link (one ``Testbed`` each), swept value, sequence, system, repetition. Each
repetition starts cold (``System.setup``), then per view: wait the think time (counted from the end of
the previous view), read the view's values, record the latency, the blocks each tier served and the
stage times (``systems.view_counters``), and check the values against the stored data (zarr, read in
this process) within the view's tol. Counters are snapshot just before and after each view; the
snapshot before is taken early enough that the view still starts when its think time is over.

One record per (link, swept value, system, pattern, sequence), pooled over repetitions: ``latency_ms``
{mean, std, p50, p95, p99}, ``hit_ratio`` (share of the view blocks each of l1, l2, l3, l4, origin
served), ``stage_ms`` (mean per view, summed over the view's blocks; null for systems without tiers),
``setup_s``, value ``mismatches``, and ``ratio_to_baseline`` (mean latency / that of ``zarr-http`` for
the same condition and sequence).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence as SequenceABC
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tierscope.bench.link import Link, parse_link
from tierscope.bench.patterns import PATTERNS, Sequence, View, generate
from tierscope.bench.systems import (
    BASELINE,
    STAGES,
    TIERS,
    DataPaths,
    System,
    Testbed,
    TierSizes,
    make_system,
    parse_systems,
    view_counters,
)
from tierscope.grid import BlockGrid

__all__ = [
    "PRESETS",
    "SWEEPABLE",
    "Condition",
    "Preset",
    "format_table",
    "latency_summary",
    "prepare_data",
    "replay",
    "rotated",
    "run_bench",
    "value_range",
]

SWEEPABLE = ("think", "tol", "l1", "l2", "l3", "l4")
REFERENCE_BUDGET = 1 << 30  # bytes of reference views kept in a run; views beyond it are re-read each time


@dataclass(frozen=True)
class Preset:
    """Data geometry, cluster size and tier capacities of a run."""

    name: str
    shape: tuple[int, int, int, int]
    block: tuple[int, int, int, int]
    workers: int
    threads: int
    sizes: TierSizes


PRESETS = {
    # 128 MiB per variable, 512 KiB blocks: fits the 2-core, 24 GiB development machine.
    "laptop": Preset("laptop", (16, 128, 128, 128), (1, 32, 64, 64), workers=2, threads=2,
                     sizes=TierSizes(l1="32MiB", l2="64MiB", l3="128MiB", l4="256MiB")),
    # Real scale on one machine: a 2 GiB variable of 1 MiB blocks; a full z-slice is 64 blocks, 64 MiB raw
    # when cold. Tiers as connect's and serve's defaults.
    "large": Preset("large", (16, 128, 512, 512), (1, 64, 64, 64), workers=2, threads=2,
                    sizes=TierSizes(l1="2GiB", l2="4GiB", l3="1GiB", l4="4GiB")),
    # The prior prototype's geometry: 256^3 = 64 MiB blocks, 4x4x4 blocks per time step (4 GiB).
    "seed": Preset("seed", (16, 1024, 1024, 1024), (1, 256, 256, 256), workers=4, threads=2,
                   sizes=TierSizes(l1="4GiB", l2="8GiB", l3="16GiB", l4="32GiB")),
}


@dataclass(frozen=True)
class Condition:
    """What a record was measured under: link, think time, tol (relative and absolute), tier sizes."""

    link: Link | None
    think_ms: float
    tol_rel: float
    tol: float
    sizes: TierSizes
    sweep: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"link": "none" if self.link is None else str(self.link), "think_ms": self.think_ms,
                "tol_rel": self.tol_rel, "tol": self.tol, "sweep": dict(self.sweep)}


# ---- metrics ------------------------------------------------------------------------------------------


def latency_summary(ms: Iterable[float]) -> dict[str, float]:
    """mean, std (population), p50, p95, p99 (linear interpolation) of latencies in ms."""
    arr = np.asarray(list(ms), dtype=float)
    if arr.size == 0:
        raise ValueError("latency_summary needs at least one latency")
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"mean": float(arr.mean()), "std": float(arr.std()), "p50": float(p50), "p95": float(p95),
            "p99": float(p99)}


def hit_ratio(blocks: dict[str, float]) -> dict[str, float]:
    """Share of blocks each tier served (all 0 for no blocks)."""
    total = sum(blocks.get(t, 0.0) for t in TIERS)
    return {t: (blocks.get(t, 0.0) / total if total else 0.0) for t in TIERS}


def _mean_stages(per_view: list[dict[str, float | None] | None]) -> dict[str, float | None] | None:
    views = [s for s in per_view if s is not None]
    if not views:
        return None
    out: dict[str, float | None] = {}
    for stage in STAGES:
        values = [v[stage] for v in views if v[stage] is not None]
        out[stage] = 1e3 * float(np.mean(values)) if values else None
    return out


def check_values(got: np.ndarray, ref: np.ndarray, tol: float) -> tuple[bool, float]:
    """(within tol everywhere, largest absolute error); NaNs must sit where the reference has them.

    One float32 rounding of the reference's magnitude is allowed on top of ``tol``: the decoder's last
    multiply-add may round either way.
    """
    got = np.asarray(got)
    if got.shape != ref.shape:
        return False, math.inf
    nan_ref, nan_got = np.isnan(ref), np.isnan(got)
    if not np.array_equal(nan_ref, nan_got):
        return False, math.inf
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    err[nan_ref] = 0.0
    slack = np.finfo(np.float32).eps * np.abs(np.where(nan_ref, 0.0, ref.astype(np.float64)))
    return bool(np.all(err <= tol + slack)), float(err.max(initial=0.0))


# ---- data ---------------------------------------------------------------------------------------------


def prepare_data(data_dir: str | Path, preset: Preset, formats: Iterable[str] = ("tiledb", "hdf5"),
                 variable: str = "u", log: Callable[[str], None] = print) -> DataPaths:
    """The preset's sample data in ``data_dir`` (made once, reused by later runs), ingested to ``formats``."""
    from tierscope.store import ingest, write_sample

    shape, block = ("x".join(map(str, dims)) for dims in (preset.shape, preset.block))
    root = Path(data_dir) / f"{preset.name}-{shape}-{block}"
    root.mkdir(parents=True, exist_ok=True)
    zarr = root / "turb.zarr"
    if not (root / ".zarr-complete").exists():
        log(f"writing sample data {zarr} ...")
        write_sample(zarr, shape=preset.shape, block=preset.block, variables=(variable,), overwrite=True)
        (root / ".zarr-complete").touch()
    if not (root / ".levels-complete").exists():  # coarse levels, for progressive views
        from tierscope.store import pyramid

        log(f"adding coarse levels to {zarr.name} ...")
        pyramid(zarr, overwrite=True)
        (root / ".levels-complete").touch()
    paths: dict[str, Path | None] = {"tiledb": None, "hdf5": None}
    for fmt in formats:
        out = root / f"turb.{'tdb' if fmt == 'tiledb' else 'h5'}"
        marker = root / f".{fmt}-complete"
        if not marker.exists():
            log(f"ingesting {zarr.name} to {out.name} ...")
            ingest(zarr, out, preset.block, fmt=fmt, overwrite=True)
            marker.touch()
        paths[fmt] = out
    return DataPaths(zarr, paths["tiledb"], paths["hdf5"], variable, preset.block)


def value_range(data: DataPaths) -> float:
    """max - min of the variable (cached beside the data): ``--tol`` is relative to it."""
    cache = data.zarr.parent / f"range-{data.variable}.json"
    if cache.exists():
        return float(json.loads(cache.read_text())["range"])
    import dask
    import xarray as xr

    var = xr.open_zarr(data.zarr, consolidated=False, chunks={})[data.variable]
    lo, hi = dask.compute(var.min(), var.max(), scheduler="threads")
    span = float(hi) - float(lo)
    cache.write_text(json.dumps({"min": float(lo), "max": float(hi), "range": span}))
    return span


class _Reference:
    """The stored values of the views, read in this process (xarray + zarr, no Dask), kept for reuse."""

    def __init__(self, data: DataPaths) -> None:
        import xarray as xr

        self.array = xr.open_zarr(data.zarr, consolidated=False, chunks=None)[data.variable]
        self._kept: dict[View, np.ndarray] = {}
        self._nbytes = 0

    def prepare(self, views: Iterable[View]) -> None:
        """Read the views' values now, before any system replays them (kept within the budget). Read during
        a replay, each would lengthen the think time after its view for the first system that met it only,
        leaving that system more time to prefetch than the others."""
        for view in views:
            self(view)

    def __call__(self, view: View) -> np.ndarray:
        values = self._kept.get(view)
        if values is None:
            values = np.asarray(self.array.isel(view.isel(self.array.dims)).values)
            if self._nbytes + values.nbytes <= REFERENCE_BUDGET:
                self._kept[view] = values
                self._nbytes += values.nbytes
        return values


# ---- replay -------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Per-view measurements of one system over one sequence, pooled over repetitions."""

    latency_ms: list[float] = field(default_factory=list)
    blocks: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIERS, 0.0))
    stages: list[dict[str, float | None] | None] = field(default_factory=list)
    first_picture_ms: list[float] = field(default_factory=list)  # progressive systems: first part
    setup_s: list[float] = field(default_factory=list)
    mismatches: int = 0
    max_error: float = 0.0
    errors: list[str] = field(default_factory=list)


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _replay_once(system: System, seq: Sequence, cond: Condition, ref: _Reference, run: _Run,
                 tick: Callable[[], None]) -> None:
    grid, think = seq.grid, cond.think_ms / 1e3
    deadline = time.perf_counter()
    snap_cost = 0.0
    for i, view in enumerate(seq.views):
        _sleep_until(deadline - snap_cost)
        t = time.perf_counter()
        before = system.snapshot()
        snap_cost = time.perf_counter() - t
        _sleep_until(deadline)
        t0 = time.perf_counter()
        values = system.read(view)
        t1 = time.perf_counter()
        after = system.snapshot()
        deadline = t1 + think
        run.latency_ms.append((t1 - t0) * 1e3)
        if (picture := getattr(system, "first_picture_s", None)) is not None:
            run.first_picture_ms.append((picture - t0) * 1e3)
        blocks, stages = view_counters(before, after, len(view.blocks(grid)))
        for tier, n in blocks.items():
            run.blocks[tier] += n
        run.stages.append(stages)
        ok, err = check_values(values, ref(view), cond.tol)
        run.max_error = max(run.max_error, err)
        if not ok:
            run.mismatches += 1
            if len(run.errors) < 5:
                run.errors.append(f"view {i} {view.to_json()}: max error {err:.3g} > tol {cond.tol:.3g}")
        tick()


def _record(name: str, system: System, seq: Sequence, cond: Condition, run: _Run,
            repeat: int) -> dict[str, Any]:
    return {
        "system": name,
        "pattern": seq.pattern,
        "sequence": seq.name,
        **cond.describe(),
        "views": len(seq.views),
        "repeat": repeat,
        "latency_ms": latency_summary(run.latency_ms),
        # progressive systems: time to the first (coarse) picture; latency_ms is time to full resolution
        "first_picture_ms": latency_summary(run.first_picture_ms) if run.first_picture_ms else None,
        **_apart(seq, run.latency_ms),
        "hit_ratio": hit_ratio(run.blocks),
        "blocks": dict(run.blocks),
        "stage_ms": _mean_stages(run.stages),
        "setup_s": float(np.mean(run.setup_s)),
        "bounded": system.bounded,
        "mismatches": run.mismatches,
        "max_error": run.max_error,
        "errors": run.errors,
        "sequence_metrics": seq.metrics(),
        "samples_ms": [round(v, 3) for v in run.latency_ms],
        "picture_samples_ms": [round(v, 3) for v in run.first_picture_ms] or None,
    }


def _apart(seq: Sequence, latency_ms: list[float]) -> dict[str, Any]:
    """The first view of each repetition, and (for sequences that mark jumps) the cold jump views and the
    warm views after them, each apart: a mean over all views hides what a user feels most."""
    n = len(seq.views)
    first = [ms for i, ms in enumerate(latency_ms) if i % n == 0]
    out: dict[str, Any] = {"first_ms": float(np.mean(first))}
    jumps = set(seq.params.get("jumps", ()))
    if jumps:
        cold = [ms for i, ms in enumerate(latency_ms) if i % n in jumps and i % n]
        warm = [ms for i, ms in enumerate(latency_ms) if i % n not in jumps]
        out["cold_ms"] = latency_summary(cold) if cold else None
        out["warm_ms"] = latency_summary(warm) if warm else None
    return out


def add_ratios(records: list[dict[str, Any]], baseline: str = BASELINE) -> None:
    """``ratio_to_baseline``: mean latency / the baseline's for the same condition and sequence."""

    def key(r: dict[str, Any]) -> str:
        return json.dumps([r["link"], r["think_ms"], r["tol_rel"], r["sweep"], r["sequence"]], sort_keys=True)

    base = {key(r): r["latency_ms"]["mean"] for r in records if r["system"] == baseline}
    for r in records:
        b = base.get(key(r))
        r["ratio_to_baseline"] = r["latency_ms"]["mean"] / b if b else None


def replay(
    sequences: SequenceABC[Sequence],
    systems: SequenceABC[str],
    data: DataPaths,
    client: Any,
    conditions: SequenceABC[Condition],
    repeat: int = 1,
    progress: Callable[[str], Callable[[], None]] | None = None,
    failures: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Replay every sequence against every system under every condition; one record per combination.

    Conditions sharing a link share one ``Testbed`` (servers and link proxies). ``progress(label)``
    returns the per-view callback (and is told what runs next). Each repetition of a sequence runs the
    systems in another order (``rotated``), pooled per system. With a ``failures`` list, a system that
    raises is noted there (system, pattern, sequence, condition, error) and the run goes on with the
    others, so one broken baseline does not lose an hour of measurements; without one, the error
    propagates.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    ref = _Reference(data)
    stored = (tuple(ref.array.shape), tuple(ref.array.encoding["chunks"]))
    for seq in sequences:
        if (seq.shape, seq.block) != stored:
            raise ValueError(f"sequence {seq.name!r} is for shape {seq.shape} in blocks {seq.block}; "
                             f"the data has shape {stored[0]} in blocks {stored[1]}")
    records: list[dict[str, Any]] = []
    by_link: dict[Link | None, list[Condition]] = {}  # the Link itself: its text rounds the numbers
    for cond in conditions:
        by_link.setdefault(cond.link, []).append(cond)
    for conds in by_link.values():
        with Testbed(data, client, conds[0].link) as bed:
            for cond in conds:
                for seq in sequences:
                    ref.prepare(seq.views)
                    made = {name: make_system(name, cond.sizes) for name in systems}
                    runs = {name: _Run() for name in systems}
                    for rep in range(repeat):
                        for name in rotated(systems, rep):
                            if name not in runs:  # failed in an earlier repetition
                                continue
                            system, run = made[name], runs[name]
                            tick = progress(f"{name} {seq.name} {cond.describe()['link']}") if progress \
                                else (lambda: None)
                            try:
                                run.setup_s.append(system.setup(bed, cond.tol))
                                try:
                                    _replay_once(system, seq, cond, ref, run, tick)
                                finally:
                                    system.teardown()
                            except Exception as exc:
                                if failures is None:
                                    raise
                                failures.append({"system": name, "pattern": seq.pattern, "sequence": seq.name,
                                                 **cond.describe(), "error": f"{type(exc).__name__}: {exc}"})
                                del runs[name]
                    records.extend(_record(name, made[name], seq, cond, run, repeat)
                                   for name, run in runs.items())
    add_ratios(records)
    return records


def rotated(systems: SequenceABC[str], rep: int) -> list[str]:
    """The systems in repetition ``rep``'s order: each repetition starts one system later. At 1 Gbit/s on
    2 cores the system first in a sequence was 7-14% faster than in second place (docs/benchmarks.md,
    issue #12), so with ``repeat`` a multiple of the systems each holds every place equally often."""
    k = rep % len(systems) if systems else 0
    return [*systems[k:], *systems[:k]]


# ---- the whole benchmark (``tierscope bench``) ----------------------------------------------------------

DEFAULT_SYSTEMS = ("tierscope", "tierscope-1100", "tierscope-0011", "raw", "fp16", "zarr-http", "zarr-local",
                   "tiledb", "hdf5", "copy-first")


def parse_sweep(text: str | None) -> tuple[str, list[Any]] | None:
    """``"think=0,100,300"`` as ("think", [0.0, 100.0, 300.0]); sizes (l1..l4) stay strings."""
    if text is None:
        return None
    var, sep, values = text.partition("=")
    var = var.strip()
    if not sep or var not in SWEEPABLE:
        raise ValueError(f"--sweep {text!r}: expected VAR=v1,v2,... with VAR one of {', '.join(SWEEPABLE)} "
                         "(sweep the link by giving --link several times)")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not items:
        raise ValueError(f"--sweep {text!r} gives no values")
    if var in ("think", "tol"):
        try:
            numbers = [float(v) for v in items]
        except ValueError:
            raise ValueError(f"--sweep {text!r}: {var} values must be numbers") from None
        if any(not math.isfinite(v) or v < 0 for v in numbers):
            raise ValueError(f"--sweep {text!r}: {var} values must be finite and >= 0")
        return var, numbers
    return var, items


def _conditions(links: SequenceABC[Link | None], think_ms: float, tol_rel: float, span: float,
                sizes: TierSizes, sweep: tuple[str, list[Any]] | None) -> list[Condition]:
    out = []
    for link in links:
        for value in (sweep[1] if sweep else [None]):
            think, tol, sz, swept = think_ms, tol_rel, sizes, {}
            if sweep:
                var = sweep[0]
                swept = {var: value}
                if var == "think":
                    think = value
                elif var == "tol":
                    tol = value
                else:
                    sz = replace(sizes, **{var: value})
            out.append(Condition(link, think, tol, tol * span, sz, swept))
    return out


def _machine() -> dict[str, Any]:
    """The machine a run was measured on (absolute times mean nothing without it), and its load."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"node": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "load_average": os.getloadavg(),
            "memory_gib": None if mem is None else round(mem / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform()}


def _progress(total: int, log: Callable[[str], None]) -> tuple[Callable[[str], Callable[[], None]],
                                                                Callable[[], None]]:
    """(start(label) -> per-view tick, close): a tqdm bar, or a plain line per run without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def start_plain(label: str) -> Callable[[], None]:
            log(f"[{done[0]}/{total} views] {label}")

            def tick() -> None:
                done[0] += 1
            return tick
        return start_plain, lambda: log(f"[{done[0]}/{total} views] done")

    bar = tqdm(total=total, unit="view", dynamic_ncols=True)

    def start(label: str) -> Callable[[], None]:
        bar.set_description(label)
        return lambda: bar.update()
    return start, bar.close


def run_bench(
    out: str | Path,
    *,
    preset: str = "laptop",
    patterns: SequenceABC[str] = ("playback", "scanning", "wandering"),
    views: int = 50,
    think_ms: float = 100.0,
    tol_rel: float = 1e-3,
    links: SequenceABC[str] = ("1gbit,0.1ms",),
    systems: SequenceABC[str] = DEFAULT_SYSTEMS,
    sequences: int = 1,
    repeat: int = 1,
    sweep: str | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Make (or reuse) the data, generate and save the sequences, replay them, write results.json + plots."""
    import logging

    from distributed import Client, LocalCluster

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    for pattern in patterns:
        if pattern not in PATTERNS:
            raise ValueError(f"unknown access pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    if views < 1 or sequences < 1 or repeat < 1:
        raise ValueError(f"--views, --sequences and --repeat must be >= 1, got {views}, {sequences}, "
                         f"{repeat}")
    if not (math.isfinite(think_ms) and think_ms >= 0):
        raise ValueError(f"--think must be >= 0 ms, got {think_ms}")
    if not (math.isfinite(tol_rel) and tol_rel >= 0):
        raise ValueError(f"--tol must be >= 0 (a fraction of the value range), got {tol_rel}")
    names = parse_systems(",".join(systems))
    parsed_links = [parse_link(text) for text in links]
    swept = parse_sweep(sweep)
    spec = PRESETS[preset]
    out = Path(out)
    (out / "sequences").mkdir(parents=True, exist_ok=True)
    if data_dir is None:
        from tierscope.demo import default_cache_dir

        data_dir = default_cache_dir() / "bench"
    formats = [f for f in ("tiledb", "hdf5") if f in names]
    data = prepare_data(data_dir, spec, formats, log=log)
    span = value_range(data)
    grid = BlockGrid(spec.shape, spec.block)
    seqs = []
    for pattern in patterns:
        for k in range(sequences):
            seq = generate(pattern, grid, views, seed + k)
            path = seq.save(out / "sequences" / f"{seq.name}.json")
            seqs.append(Sequence.load(path))  # replay exactly what was saved
    conditions = _conditions(parsed_links, think_ms, tol_rel, span, spec.sizes, swept)
    total = len(conditions) * len(seqs) * len(names) * repeat * views
    log(f"{len(seqs)} sequences x {len(names)} systems x {len(conditions)} conditions x {repeat} repeats "
        f"({total} views); data {data.zarr} (range {span:.4g})")
    start, close = _progress(total, log)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    t0, machine = time.perf_counter(), _machine()
    failures: list[dict[str, Any]] = []
    try:
        with (
            LocalCluster(n_workers=spec.workers, threads_per_worker=spec.threads, processes=True,
                         dashboard_address=None, silence_logs=logging.ERROR) as cluster,
            Client(cluster) as client,
        ):
            records = replay(seqs, names, data, client, conditions, repeat=repeat, progress=start,
                             failures=failures)
    finally:
        close()
    for failure in failures:
        log(f"{failure['system']} failed on {failure['sequence']} ({failure['link']}): {failure['error']}")
    results = {
        "machine": {**machine, "load_average_after": os.getloadavg()},
        "preset": {**asdict(spec), "sizes": asdict(spec.sizes)},
        "run": {"patterns": list(patterns), "views": views, "think_ms": think_ms, "tol_rel": tol_rel,
                "value_range": span, "links": list(links), "systems": names, "sequences": sequences,
                "repeat": repeat, "sweep": sweep, "seed": seed, "wall_s": time.perf_counter() - t0},
        "records": records,
        "failures": failures,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if plots:
        from tierscope.bench.plots import plot_results

        results["plots"] = [str(p) for p in plot_results(results, out)]
    return results


def summarise(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records pooled over sequences: one row per (link, sweep, pattern, system), means of their figures."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        key = (r["link"], json.dumps(r["sweep"], sort_keys=True), r["think_ms"], r["tol_rel"], r["pattern"],
               r["system"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (link, _, think, tol_rel, pattern, system), rs in groups.items():
        ratios = [r["ratio_to_baseline"] for r in rs if r.get("ratio_to_baseline") is not None]
        stages = [r["stage_ms"] for r in rs if r["stage_ms"] is not None]
        rows.append({
            "link": link, "sweep": rs[0]["sweep"], "think_ms": think, "tol_rel": tol_rel, "pattern": pattern,
            "system": system,
            "mean_ms": float(np.mean([r["latency_ms"]["mean"] for r in rs])),
            "p95_ms": float(np.mean([r["latency_ms"]["p95"] for r in rs])),
            "first_ms": float(np.mean([r["first_ms"] for r in rs])),
            "cold_mean_ms": _mean_of(rs, "cold_ms"),
            "picture_mean_ms": _mean_of(rs, "first_picture_ms"),
            "picture_p95_ms": _mean_of(rs, "first_picture_ms", "p95"),
            "warm_mean_ms": _mean_of(rs, "warm_ms"),
            "ratio": float(np.mean(ratios)) if ratios else None,
            "hit_ratio": {t: float(np.mean([r["hit_ratio"][t] for r in rs])) for t in TIERS},
            "stage_ms": None if not stages else {
                s: (float(np.mean([x[s] for x in stages if x[s] is not None]))
                    if any(x[s] is not None for x in stages) else None) for s in STAGES},
            "setup_s": float(np.mean([r["setup_s"] for r in rs])),
            "mismatches": sum(r["mismatches"] for r in rs),
            "bounded": rs[0]["bounded"],
        })
    return rows


def _mean_of(records: list[dict[str, Any]], key: str, figure: str = "mean") -> float | None:
    values = [r[key][figure] for r in records if r.get(key)]
    return float(np.mean(values)) if values else None


def format_table(records: Iterable[dict[str, Any]]) -> str:
    """A Markdown table per (link, sweep value, pattern): latency, ratio to zarr-http, tier shares."""
    rows = summarise(records)
    lines: list[str] = []
    current = None
    for row in rows:
        head = (row["link"], json.dumps(row["sweep"]), row["think_ms"], row["tol_rel"], row["pattern"])
        if head != current:
            current = head
            sweep = "".join(f", {k}={v}" for k, v in row["sweep"].items())
            lines += ["", f"**{row['pattern']}**, link {row['link']}, think {row['think_ms']:g} ms, "
                          f"tol {row['tol_rel']:g} of range{sweep}", "",
                      "| system | mean ms | p95 ms | first ms | cold ms | warm ms | picture mean/p95 ms "
                      "| / zarr-http | L1 | L2 | L3 | L4 | origin | setup s | mismatches |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        h = row["hit_ratio"]
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        bad = f"{row['mismatches']}" + ("" if row["bounded"] else " (unbounded codec)")
        cold, warm = (("" if v is None else f"{v:.1f}") for v in (row["cold_mean_ms"], row["warm_mean_ms"]))
        picture = ("" if row["picture_mean_ms"] is None
                   else f"{row['picture_mean_ms']:.1f} / {row['picture_p95_ms']:.1f}")
        lines.append(f"| {row['system']} | {row['mean_ms']:.1f} | {row['p95_ms']:.1f} | {row['first_ms']:.1f} | "
                     f"{cold} | {warm} | {picture} | {ratio} | "
                     + " | ".join(f"{h[t]:.0%}" for t in TIERS)
                     + f" | {row['setup_s']:.2f} | {bad} |")
    return "\n".join(lines).lstrip("\n")
