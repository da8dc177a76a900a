"""What building coarse levels costs: time and disk of ``ingest --levels N`` against level 0 alone, for
each store format, and of ``pyramid`` and ``sample --levels N`` against writing level 0.

    python benchmarks/levels_build.py [--shape 2,64,1024,1024] [--levels 4] [--repeats 5] [--data DIR]

The source is a sample (one float32 variable in 1 MiB blocks; by default 512 MiB, in which 4 coarse
levels fit), written once into DIR. Runs with and without levels alternate, so a load from other jobs
on the machine hits both alike; each pair gives one ratio, and the median ratio and its range over the
repeats are printed, for wall time and for CPU time (all threads), which such a load disturbs less.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tierscope.store import ingest, pyramid, write_sample
from tierscope.store.ingest import _delete

BLOCK = (1, 64, 64, 64)

Times = list[tuple[float, float]]
"""(wall, CPU) seconds of each repeat."""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(run: Callable[[], object], times: Times, out: Path | None = None) -> None:
    """Time ``run``; ``out``, which it writes, is removed before, so no run pays for removing another's."""
    if out is not None:
        _delete(out)
    start, cpu = time.perf_counter(), _cpu()
    run()
    times.append((time.perf_counter() - start, _cpu() - cpu))


def _disk(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def _ratio(what: str, base: Times, full: Times, clock: int) -> str:
    ratios = [f[clock] / b[clock] for b, f in zip(base, full, strict=True)]
    return (f"{what} {statistics.median(b[clock] for b in base):.2f} -> "
            f"{statistics.median(f[clock] for f in full):.2f} s: {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f})")


def _plus(first: Times, then: Times) -> Times:
    return [(w1 + w2, c1 + c2) for (w1, c1), (w2, c2) in zip(first, then, strict=True)]


def _report(what: str, base: Times, full: Times, extra: str = "") -> None:
    print(f"{what:<24} {_ratio('wall', base, full, 0)}; {_ratio('CPU', base, full, 1)}{extra}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2,64,1024,1024", help="sample shape T,Z,Y,X")
    parser.add_argument("--levels", type=int, default=4, help="coarse levels to build")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", default="zarr,tiledb,hdf5", help="ingest output formats")
    parser.add_argument("--no-pyramid", action="store_true", help="skip the pyramid and sample --levels runs")
    parser.add_argument("--data", default=None, help="directory for the sample and the outputs "
                                                     "(default: a temporary one)")
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp)
        src = root / f"levels-src-{'x'.join(map(str, shape))}.zarr"
        if not src.exists():
            write_sample(src, shape=shape, block=BLOCK, variables=("u",))
        print(f"{src.name}: {_disk(src) / 2**20:.0f} MiB on disk, {args.levels} coarse levels, "
              f"{args.repeats} repeats; level 0 -> with levels, median (range) of the ratios", flush=True)
        level0: dict[str, Times] = {}
        for fmt in args.formats.split(","):
            out = root / f"levels-out.{fmt}"
            base, full = [], []
            level0[fmt] = base
            for _ in range(args.repeats):
                _timed(lambda: ingest(src, out, BLOCK, fmt=fmt), base, out)
                size = _disk(out)
                _timed(lambda: ingest(src, out, BLOCK, fmt=fmt, levels=args.levels), full, out)
            _report(f"ingest --format {fmt}", base, full, f"; disk +{100 * (_disk(out) / size - 1):.1f}%")
            _delete(out)
        if args.no_pyramid:
            return
        out = root / "levels-sample.zarr"
        written, built = [], []
        for _ in range(args.repeats):
            _timed(lambda: write_sample(out, shape=shape, block=BLOCK, variables=("u",)), written, out)
            _timed(lambda: pyramid(out, args.levels), built)
        _report("sample --levels", written, _plus(written, built))
        if "zarr" in level0:
            _report("ingest, then pyramid", level0["zarr"], _plus(level0["zarr"], built))
        _delete(out)


if __name__ == "__main__":
    main()
