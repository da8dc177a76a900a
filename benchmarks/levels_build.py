"""What building coarse levels costs: time and disk of ``ingest --levels N`` against level 0 alone, for
each store format, and of ``pyramid`` and ``sample --levels N`` against writing level 0.

    python benchmarks/levels_build.py [--shape 2,64,1024,1024] [--source zarr|netcdf] [--levels 4]
                                      [--repeats 5] [--cold] [--data DIR]

The source is a sample (one float32 variable in 1 MiB blocks; by default 512 MiB, in which 4 coarse
levels fit), written once into DIR as a zarr store or, with ``--source netcdf`` (netCDF4, in the
``bench`` extra), as the contiguous, uncompressed netCDF4 file many simulation codes write: cheaper to
read, so the levels' share of an ingest is larger. Runs with and without levels alternate, in the order
AB BA AB ..., so a drift in the machine's speed hits both alike; each pair gives one ratio, and the
median, mean and range of the ratios are printed, for wall time and for CPU time (all threads), which a
load from other jobs disturbs less. Before each run the output is removed and the page cache written
back (``os.sync``), untimed: no run pays for writing back another's files. One untimed ingest with
levels first loads what every run uses (imports, the compiled coarsening loop: 0.5-0.9 s once per
process, not measured here).

By default the source stays in the page cache between runs: reading it costs only a copy, so the
ingest is CPU-bound, the worst case for the levels' share. ``--cold`` drops the source's pages from the
page cache before each run (``posix_fadvise``, Linux), so it is read from the disk, as an ingest of data
larger than memory always reads it; ``pyramid`` then reads level 0 from the disk.

Every run follows the removal of the previous run's output. On ext4 without a journal, files created
soon after others were deleted cost more (its inode allocator skips recently deleted inodes), and the
levels make a third more files; ``--data`` on a tmpfs (``/dev/shm``) measures the work without the
filesystem.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import xarray as xr

from tierscope.store import ingest, pyramid, write_sample
from tierscope.store.ingest import _delete

BLOCK = (1, 64, 64, 64)

Times = list[tuple[float, float]]
"""(wall, CPU) seconds of each repeat."""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(run: Callable[[], object], times: Times, out: Path | None = None,
           cold: Path | None = None) -> None:
    """Time ``run``; ``out``, which it writes, is removed before and the removal and every earlier write
    reach the disk, so no run pays for removing or writing back another's files; then ``cold``, what it
    reads, leaves the page cache."""
    if out is not None:
        _delete(out)
    os.sync()
    if cold is not None:
        _evict(cold)
    start, cpu = time.perf_counter(), _cpu()
    run()
    times.append((time.perf_counter() - start, _cpu() - cpu))


def _evict(path: Path) -> None:
    """Drop ``path``'s pages (a file, or every file of a store) from the page cache: only the source's,
    so that libraries' code and Python's stay resident, as in a long ingest."""
    for file in _files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _files(path: Path) -> list[Path]:
    """``path`` itself if a file, else every file of the store."""
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in _files(path))


def _ratio(what: str, base: Times, full: Times, clock: int) -> str:
    ratios = [f[clock] / b[clock] for b, f in zip(base, full, strict=True)]
    return (f"{what} {statistics.median(b[clock] for b in base):.2f} -> "
            f"{statistics.median(f[clock] for f in full):.2f} s: {statistics.median(ratios):.2f}x "
            f"(mean {statistics.mean(ratios):.2f}, {min(ratios):.2f}-{max(ratios):.2f})")


def _plus(first: Times, then: Times) -> Times:
    return [(w1 + w2, c1 + c2) for (w1, c1), (w2, c2) in zip(first, then, strict=True)]


def _report(what: str, base: Times, full: Times, extra: str = "") -> None:
    print(f"{what:<24} {_ratio('wall', base, full, 0)}; {_ratio('CPU', base, full, 1)}{extra}", flush=True)


def _source(root: Path, shape: tuple[int, ...], fmt: str) -> Path:
    """The sample in ``root`` (written on first use): zarr, or a contiguous uncompressed netCDF4 copy."""
    name = f"levels-src-{'x'.join(map(str, shape))}"
    store = root / f"{name}.zarr"
    if not store.exists():
        write_sample(store, shape=shape, block=BLOCK, variables=("u",))
    if fmt == "zarr":
        return store
    path = root / f"{name}.nc"
    if not path.exists():
        with xr.open_dataset(store, engine="zarr", consolidated=False) as ds:
            ds.drop_encoding().to_netcdf(path, engine="netcdf4")  # no chunks, no filters
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2,64,1024,1024", help="sample shape T,Z,Y,X")
    parser.add_argument("--source", default="zarr", choices=("zarr", "netcdf"), help="the sample's format")
    parser.add_argument("--levels", type=int, default=4, help="coarse levels to build")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="drop the source from the page cache before "
                                                            "each run (Linux): it is read from disk")
    parser.add_argument("--formats", default="zarr,tiledb,hdf5", help="ingest output formats")
    parser.add_argument("--no-pyramid", action="store_true", help="skip the pyramid and sample --levels runs")
    parser.add_argument("--data", default=None, help="directory for the sample and the outputs "
                                                     "(default: a temporary one)")
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp)
        src = _source(root, shape, args.source)
        print(f"{src.name}: {_disk(src) / 2**20:.0f} MiB on disk, {args.levels} coarse levels, "
              f"{args.repeats} repeats, {'cold' if args.cold else 'warm'} page cache; level 0 -> with "
              f"levels, median (mean, range) of the ratios", flush=True)
        level0: dict[str, Times] = {}
        for fmt in args.formats.split(","):
            out = root / f"levels-out.{fmt}"
            base, full = [], []
            level0[fmt] = base
            ingest(src, out, BLOCK, fmt=fmt, levels=args.levels, overwrite=True)  # warm: imports, kernels
            sizes = {}
            for i in range(args.repeats):
                for levels in (0, args.levels) if i % 2 == 0 else (args.levels, 0):
                    times = full if levels else base
                    _timed(lambda n=levels: ingest(src, out, BLOCK, fmt=fmt, levels=n), times, out,
                           src if args.cold else None)
                    sizes[levels] = _disk(out)
            extra = 100 * (sizes[args.levels] / sizes[0] - 1)
            _report(f"ingest --format {fmt}", base, full, f"; disk +{extra:.1f}%")
            _delete(out)
        if args.no_pyramid:
            return
        out = root / "levels-sample.zarr"
        written, built = [], []
        sample = partial(write_sample, out, shape=shape, block=BLOCK, variables=("u",))
        for _ in range(args.repeats):
            _timed(sample, written, out)
            _timed(lambda: pyramid(out, args.levels), built, cold=out if args.cold else None)
        _report("sample --levels", written, _plus(written, built))
        if "zarr" in level0:
            _report("ingest, then pyramid", level0["zarr"], _plus(level0["zarr"], built))
        _delete(out)


if __name__ == "__main__":
    main()
