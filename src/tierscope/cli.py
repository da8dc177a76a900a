"""The ``tierscope`` command: sample, ingest, serve, demo, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _cmd_sample(args: argparse.Namespace) -> None:
    from tierscope.store import write_sample

    out = write_sample(
        args.out, shape=args.shape, block=args.block, variables=tuple(args.variables.split(",")),
        seed=args.seed, overwrite=args.overwrite,
    )
    print(f"wrote {out}")


def _cmd_ingest(args: argparse.Namespace) -> None:
    from tierscope.store import ingest, parse_block_spec

    out = ingest(args.input, args.out, parse_block_spec(args.block), fmt=args.format,
                 overwrite=args.overwrite)
    print(f"wrote {out}")


def _cmd_serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    from tierscope.server import BlockService, run_server
    from tierscope.store.origin import open_origin

    token = None
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --token-file {args.token_file!r}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"--token-file {args.token_file!r} is empty")
    service = BlockService([open_origin(path) for path in args.stores], args.codec, l3=args.l3, l4=args.l4,
                           policy=args.policy, prefetch=args.prefetch, device=args.device)
    for name in service.datasets():
        print(f"serving http://{args.host}:{args.port}/datasets/{name}", flush=True)
    run_server(service, args.host, args.port, token=token)


def _cmd_demo(args: argparse.Namespace) -> None:
    from tierscope.demo import run_demo

    run_demo(cache_dir=args.cache_dir, shape=args.shape, block=args.block, workers=args.workers,
             think=args.think / 1e3)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return values


def _cmd_bench_codec(args: argparse.Namespace) -> None:
    from tierscope.bench.codec import format_table, run_codec_bench

    results = run_codec_bench(args.out, n=args.n, rels=args.rels, codecs=tuple(args.codecs.split(",")),
                              repeats=args.repeats, plots=not args.no_plots)
    print(format_table(results))
    if results["skipped_codecs"]:
        print(f"skipped (not installed): {', '.join(results['skipped_codecs'])}")
    print(f"wrote {args.out}/results.json")


def _cmd_bench_replay(args: argparse.Namespace) -> None:
    from tierscope.bench.replay import DEFAULT_SYSTEMS, format_table, run_bench

    systems = DEFAULT_SYSTEMS if args.systems is None else [s for s in args.systems.split(",") if s]
    results = run_bench(
        args.bench_out, preset=args.preset, patterns=[p for p in args.pattern.split(",") if p],
        views=args.views, think_ms=args.think, tol_rel=args.tol, links=args.link or ["1gbit,0.1ms"],
        systems=systems, sequences=args.sequences, repeat=args.repeat,
        sweep=args.sweep, data_dir=args.data_dir, seed=args.seed, plots=not args.bench_no_plots,
    )
    print(format_table(results["records"]))
    bad = [r for r in results["records"] if r["mismatches"] and r["bounded"]]
    print(f"wrote {args.bench_out}/results.json and {len(results.get('plots', []))} plots")
    if results["failures"]:
        raise ValueError(f"{len(results['failures'])} runs failed: " + "; ".join(
            f"{f['system']} {f['sequence']}: {f['error']}" for f in results["failures"][:3]))
    if bad:
        raise ValueError(f"{len(bad)} runs returned values outside tol: "
                         + "; ".join(f"{r['system']} {r['sequence']}: {r['errors'][0]}" for r in bad[:3]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="write a synthetic turbulence-like dataset (zarr v3)")
    p.add_argument("out")
    p.add_argument("--shape", type=_ints, default=(16, 64, 128, 128), help="T,Z,Y,X")
    p.add_argument("--block", type=_ints, default=(1, 32, 64, 64), help="block shape t,z,y,x")
    p.add_argument("--variables", default="u,v,w,p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("ingest", help="convert anything xarray opens into a block-aligned store")
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--block", required=True, help="1,64,64,64 or time=1,z=64,...")
    p.add_argument("--format", default="zarr", choices=("zarr", "tiledb", "hdf5"),
                   help="output store format (default: zarr v3)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("serve", help="serve stores over HTTP as a block server")
    p.add_argument("stores", nargs="+", metavar="STORE")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--l3", default="1GiB", help="encoded-block tier size, e.g. 1GiB (0 = off)")
    p.add_argument("--l4", default="4GiB", help="raw-block tier size, e.g. 4GiB (0 = off)")
    p.add_argument("--policy", default="lru", choices=("lru", "lfu", "fifo", "distance"))
    p.add_argument("--prefetch", default="on",
                   help="on (= auto), off, neighbourhood, momentum, playback or auto")
    p.add_argument("--token-file", default=None, help="file holding a bearer token clients must send")
    p.add_argument("--codec", default="lorenzo",
                   help="codec of the frames: lorenzo (fast encode), bounded (smaller: the better of lorenzo "
                        "and interp per block), interp, zstd, raw, fp16, zfp, sz3")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="where blocks are encoded (auto: the GPU when CuPy sees one)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="explore a sample dataset through a local server and cluster")
    p.add_argument("--cache-dir", default=None, help="where the sample dataset is kept")
    p.add_argument("--shape", type=_ints, default=(16, 64, 128, 128), help="T,Z,Y,X")
    p.add_argument("--block", type=_ints, default=(1, 32, 64, 64), help="block shape t,z,y,x")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--think", type=float, default=100.0, help="pause before each view, ms (a slider's pace)")
    p.set_defaults(func=_cmd_demo)

    bench = sub.add_parser(
        "bench", help="evaluation harness: replay access patterns against tierscope and baselines",
        description="Replay saved access sequences against every system in one run (see "
                    "docs/benchmarks-harness.md); 'tierscope bench codec' runs the codec benchmark.")
    bench.add_argument("--pattern", default="playback,scanning,wandering",
                       help="comma-separated: playback, scanning, wandering, random_jumps, zoom_pan")
    bench.add_argument("--views", type=int, default=50, help="views per sequence")
    bench.add_argument("--think", type=float, default=100.0, help="think time between views, ms")
    bench.add_argument("--tol", type=float, default=1e-3, help="error bound as a fraction of the value range")
    bench.add_argument("--link", action="append", default=None,
                       help="RATE,DELAY like 1gbit,0.1ms or 'none'; repeat to sweep links")
    bench.add_argument("--systems", default=None,
                       help="comma-separated systems (tierscope, tierscope-TIERS e.g. tierscope-1010, raw, "
                            "fp16, zarr-http, zarr-local, tiledb, hdf5, copy-first; default: tierscope, "
                            "tierscope-1100, tierscope-0011 and every baseline)")
    bench.add_argument("--sequences", type=int, default=1, help="sequences per pattern (seeds seed..)")
    bench.add_argument("--repeat", type=int, default=1, help="repetitions of each sequence per system")
    bench.add_argument("--sweep", default=None, help="VAR=v1,v2,... with VAR think, tol, l1, l2, l3 or l4")
    bench.add_argument("--preset", default="laptop", choices=("laptop", "seed"))
    bench.add_argument("--data-dir", default=None, help="where the sample data is made and kept")
    bench.add_argument("--seed", type=int, default=0, help="first sequence seed")
    bench.add_argument("--out", dest="bench_out", default="bench-out/replay",
                       help="directory for results.json, the sequences and the plots")
    bench.add_argument("--no-plots", dest="bench_no_plots", action="store_true")
    bench.set_defaults(func=_cmd_bench_replay)
    bench_sub = bench.add_subparsers(dest="bench_command", required=False)
    p = bench_sub.add_parser("codec", help="codec ratio, error and speed on synthetic and real fields")
    p.add_argument("--out", default="bench-out/codec", help="directory for results.json and plots")
    p.add_argument("--n", type=int, default=64, help="side of the synthetic n^3 fields")
    p.add_argument("--rels", type=_floats, default=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                   help="tolerances as fractions of each field's value range")
    p.add_argument("--codecs", default="lorenzo,interp,bounded,zstd,fp16,zfp,sz3")
    p.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=_cmd_bench_codec)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from tierscope.errors import TierscopeError

    try:
        args.func(args)
    except (TierscopeError, ValueError, FileExistsError) as exc:
        print(f"tierscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
