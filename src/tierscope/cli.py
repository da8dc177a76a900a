"""The ``tierscope`` command: sample, ingest, pyramid, serve, demo, bench."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from tierscope import config

__all__ = ["main"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM as an exception in the main thread, so clean-up code runs (a plain SIGTERM
    ends the process on the spot, leaving an ingest's partial store behind)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signum)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``_Interrupted`` while a command runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


class _ProgressLine:
    """Progress on stderr, kept short: rewritten in place on a terminal, one line per tenth otherwise
    (a log gets at most 11 lines)."""

    def __init__(self, command: str, describe: Callable[[int, int], str]) -> None:
        self._prefix, self._describe = f"tierscope {command}", describe
        self._tty = sys.stderr.isatty()
        self._shown = -1

    def __call__(self, done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        shown = percent if self._tty else percent // 10 * 10
        if shown <= self._shown:
            return
        self._shown = shown
        end = "\n" if done >= total or not self._tty else ""
        text = f"{self._prefix}: {percent}% ({self._describe(done, total)})"
        print(("\r" if self._tty else "") + text, end=end, file=sys.stderr, flush=True)


def _refuse_existing(out: str, overwrite: bool) -> None:
    """Checked here to name the flag: the library's message names its ``overwrite=True`` argument."""
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _mib(done: int, total: int) -> str:
    return f"{done / 2**20:.1f} of {total / 2**20:.1f} MiB"


def _wrote(out: Path | str, levels: int) -> str:
    return f"wrote {out}" + (f" with levels 0..{levels - 1}" if levels > 1 else "")


def _cmd_sample(args: argparse.Namespace) -> None:
    from tierscope.store import pyramid, write_sample

    _refuse_existing(args.out, args.overwrite)
    progress = None if args.quiet else _ProgressLine("sample", lambda done, n: f"{done} of {n} time steps")
    out = write_sample(
        args.out, shape=args.shape, block=args.block, variables=tuple(args.variables.split(",")),
        seed=args.seed, overwrite=args.overwrite, progress=progress,
    )
    levels = 1
    if args.levels:
        progress = None if args.quiet else _ProgressLine("sample: levels",
                                                         lambda done, n: f"{_mib(done, n)} read")
        levels = pyramid(out, args.levels, progress=progress)
    print(_wrote(out, levels))


def _cmd_ingest(args: argparse.Namespace) -> None:
    from tierscope.store import ingest, parse_block_spec
    from tierscope.store.origin import open_origin

    block = None if args.block is None else parse_block_spec(args.block)
    _refuse_existing(args.out, args.overwrite)
    progress = None if args.quiet else _ProgressLine("ingest", _mib)
    out = ingest(args.inputs, args.out, block, fmt=args.format, overwrite=args.overwrite, progress=progress,
                 levels=args.levels, tol=args.tol)
    origin = open_origin(out)
    try:
        print(_wrote(out, origin.info().levels))
    finally:
        origin.close()


def _cmd_pyramid(args: argparse.Namespace) -> None:
    from tierscope.store import pyramid

    if not args.overwrite:  # the library's message names its overwrite=True argument
        from tierscope.store.origin import open_origin

        origin = open_origin(args.store)
        try:
            if origin.info().levels > 1:
                raise FileExistsError(f"{args.store} already has levels 0..{origin.info().levels - 1}; "
                                      "pass --overwrite to rebuild them")
        finally:
            origin.close()
    progress = None if args.quiet else _ProgressLine("pyramid", lambda done, n: f"{_mib(done, n)} read")
    levels = pyramid(args.store, args.levels, overwrite=args.overwrite, progress=progress)
    if levels > 1:
        print(_wrote(args.store, levels))
    elif args.levels == 0:
        print(f"{args.store} has level 0 only")
    else:
        print(f"{args.store} fits in one block per time step already: no coarse levels to add")


def _cmd_serve(args: argparse.Namespace) -> None:
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
                           policy=args.policy, prefetch=args.prefetch, device=args.device,
                           adapt=args.adapt == "on", planner=args.planner, prefetch_loads=args.prefetch_loads)

    def announce(url: str) -> None:
        for name in service.datasets():
            print(f"serving {url}/datasets/{name}", flush=True)

    run_server(service, args.host, args.port, token=token, ready=announce)


def _cmd_demo(args: argparse.Namespace) -> None:
    from tierscope.demo import run_demo

    run_demo(cache_dir=args.cache_dir, shape=args.shape, block=args.block, workers=args.workers,
             think=args.think / 1e3)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


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
    from tierscope import __version__  # the installed distribution's, from importlib.metadata

    parser = argparse.ArgumentParser(prog="tierscope", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="write a synthetic turbulence-like dataset (zarr v3)",
                       description="Write a synthetic turbulence-like dataset (k^-5/3 spectrum) as zarr v3.")
    p.add_argument("out", help="the zarr v3 store to write, e.g. turb.zarr")
    p.add_argument("--shape", type=_ints, default=(16, 64, 128, 128),
                   help="dataset shape T,Z,Y,X (default: 16,64,128,128)")
    p.add_argument("--block", type=_ints, default=(1, 32, 64, 64),
                   help="block shape t,z,y,x (default: 1,32,64,64)")
    p.add_argument("--variables", default="u,v,w,p", help="comma-separated variable names (default: u,v,w,p)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data "
                                                       "(default: 0)")
    p.add_argument("--levels", type=_count, default=0, metavar="N",
                   help="also write N coarse levels (level k: 2^k coarser in z, y, x), at most until one "
                        "block per time step; 0 = none (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="print no progress on stderr")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser(
        "ingest", help="convert anything xarray opens into a block-aligned store",
        description="Convert netCDF3/4, HDF5 or zarr input into a zarr v3, TileDB or HDF5 store whose chunks "
                    "are tierscope blocks. Several inputs are combined by their coordinates (as "
                    "xarray.open_mfdataset(..., combine='by_coords')).")
    p.add_argument("inputs", nargs="+", metavar="IN",
                   help="input file or store; several, or a quoted glob pattern such as 'data/*.nc'")
    p.add_argument("out", metavar="OUT", help="the store to write; its directory must exist")
    p.add_argument("--block", default=None,
                   help="block shape, 1,64,64,64 or time=1,z=64,... (default: time=1 and the source's "
                        "chunks halved or doubled to about 1 MiB)")
    p.add_argument("--format", default="zarr", choices=("zarr", "tiledb", "hdf5"),
                   help="output store format (default: zarr v3)")
    p.add_argument("--tol", type=float, default=0.0,
                   help="store floating-point variables pre-encoded, as frames within this absolute bound "
                        "(zarr only): served with no encode to views with at least this tol (default: 0, "
                        "the values as they are)")
    p.add_argument("--levels", type=_count, default=0, metavar="N",
                   help="also write N coarse levels (level k: 2^k coarser along the spatial dimensions, in "
                        "the same pass), at most until one block per time step; 0 = none (default: 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a store, once the new one is complete")
    p.add_argument("--quiet", action="store_true", help="print no progress on stderr")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser(
        "pyramid", help="add coarse levels (a multiscale pyramid) to a store",
        description="Add coarse levels to a zarr v3, TileDB or HDF5 store from its level 0: level k is 2^k "
                    "coarser along the spatial dimensions (never time), block means (the first value for "
                    "integers), on the same block shape; served as NAME@k. zarr stores get OME-Zarr "
                    "multiscales metadata. See docs/stores.md.")
    p.add_argument("store", metavar="STORE", help="the store (its level 0 is read, never changed)")
    p.add_argument("--levels", type=_count, default=None, metavar="N",
                   help="how many coarse levels beyond level 0 (default: all until one block per time step)")
    p.add_argument("--overwrite", action="store_true", help="replace the levels the store has")
    p.add_argument("--quiet", action="store_true", help="print no progress on stderr")
    p.set_defaults(func=_cmd_pyramid)

    p = sub.add_parser("serve", help="serve stores over HTTP as a block server",
                       description="Serve stores (zarr v3, TileDB, HDF5, sample:// URLs) as a block server.")
    p.add_argument("stores", nargs="+", metavar="STORE",
                   help="a store path or a sample://NAME?shape=T,Z,Y,X URL; served under its name")
    # defaults: dask.config's tierscope.serve.* (docs/configuration.md)
    p.add_argument("--host", default=config.get("serve.host"),
                   help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    p.add_argument("--port", type=int, default=config.get("serve.port"),
                   help="port to listen on; 0 picks a free one (default: %(default)s)")
    p.add_argument("--l3", default=config.get("serve.l3"),
                   help="encoded-block tier size, e.g. 1GiB; 0 = off (default: %(default)s)")
    p.add_argument("--l4", default=config.get("serve.l4"),
                   help="raw-block tier size, e.g. 4GiB; 0 = off (default: %(default)s)")
    p.add_argument("--policy", default=config.get("serve.policy"), choices=("lru", "lfu", "fifo", "distance"),
                   help="tier eviction policy (default: %(default)s)")
    p.add_argument("--prefetch", default=config.get("serve.prefetch"),
                   help="on (= auto), off, neighbourhood, momentum, playback or auto (default: %(default)s)")
    p.add_argument("--token-file", default=None,
                   help="file holding a bearer token clients must send (default: no token)")
    p.add_argument("--codec", default=config.get("serve.codec"),
                   help="codec of the frames: lorenzo (fast encode), bounded (smaller: the better of lorenzo "
                        "and interp per block), interp, zstd, raw, fp16, zfp, sz3 (default: %(default)s)")
    p.add_argument("--device", default=config.get("serve.device"), choices=("auto", "cpu", "gpu"),
                   help="where blocks are encoded; auto: the GPU when CuPy sees one (default: %(default)s)")
    p.add_argument("--adapt", default=config.get("serve.adapt"), choices=("on", "off"),
                   help="on: answer a user's miss with what reaches the client first on the link it reports "
                        "(the raw block or a tighter cached frame when encoding would take longer; "
                        "docs/server.md) (default: %(default)s)")
    p.add_argument("--planner", default=config.get("serve.planner"), choices=("process", "thread"),
                   help="where prefetch plans are made: a child process of the server's, which shares no GIL "
                        "with its event loop, or a thread (default: %(default)s)")
    p.add_argument("--prefetch-loads", default=config.get("serve.prefetch_loads"),
                   choices=("process", "thread"),
                   help="where prefetch reads and encodes of blocks L4 lacks run: child processes, which "
                        "share no GIL with the event loop, or threads (default: %(default)s)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="explore a sample dataset through a local server and cluster")
    p.add_argument("--cache-dir", default=None,
                   help="where the sample dataset is kept (default: a per-user cache directory)")
    p.add_argument("--shape", type=_ints, default=(16, 64, 128, 128),
                   help="dataset shape T,Z,Y,X (default: 16,64,128,128)")
    p.add_argument("--block", type=_ints, default=(1, 32, 64, 64),
                   help="block shape t,z,y,x (default: 1,32,64,64)")
    p.add_argument("--workers", type=int, default=2, help="dask workers of the local cluster (default: 2)")
    p.add_argument("--think", type=float, default=100.0,
                   help="pause before each view, ms: a slider's pace (default: 100)")
    p.set_defaults(func=_cmd_demo)

    bench = sub.add_parser(
        "bench", help="evaluation harness: replay access patterns against tierscope and baselines",
        description="Replay saved access sequences against every system in one run (see "
                    "docs/benchmarks-harness.md); 'tierscope bench codec' runs the codec benchmark.")
    bench.add_argument("--pattern", default="playback,scanning,wandering",
                       help="comma-separated: playback, scanning, wandering, random_jumps, jumps (a jump, then "
                            "3 steps of t+1; cold views reported apart), zoom_pan "
                            "(default: playback,scanning,wandering)")
    bench.add_argument("--views", type=int, default=50, help="views per sequence (default: 50)")
    bench.add_argument("--think", type=float, default=100.0,
                       help="think time between views, ms (default: 100)")
    bench.add_argument("--tol", type=float, default=1e-3,
                       help="error bound as a fraction of the value range (default: 0.001)")
    bench.add_argument("--link", action="append", default=None,
                       help="RATE,DELAY like 1gbit,0.1ms or 'none'; repeat to sweep links "
                            "(default: 1gbit,0.1ms)")
    bench.add_argument("--systems", default=None,
                       help="comma-separated systems (tierscope, tierscope-TIERS e.g. tierscope-1010, raw, "
                            "fp16, zarr-http, zarr-local, tiledb, hdf5, copy-first; default: tierscope, "
                            "tierscope-1100, tierscope-0011 and every baseline)")
    bench.add_argument("--sequences", type=int, default=1,
                       help="sequences per pattern, seeds seed.. (default: 1)")
    bench.add_argument("--repeat", type=int, default=1,
                       help="repetitions of each sequence per system (default: 1)")
    bench.add_argument("--sweep", default=None,
                       help="VAR=v1,v2,... with VAR think, tol, l1, l2, l3 or l4 (default: no sweep)")
    bench.add_argument("--preset", default="laptop", choices=("laptop", "large", "seed"),
                       help="dataset and tier sizes: laptop (128 MiB), large (2 GiB of 1 MiB blocks, 64 MiB "
                            "z-slices), seed (64 MiB blocks) (default: laptop)")
    bench.add_argument("--data-dir", default=None,
                       help="where the sample data is made and kept (default: a per-user cache directory)")
    bench.add_argument("--seed", type=int, default=0, help="first sequence seed (default: 0)")
    bench.add_argument("--out", dest="bench_out", default="bench-out/replay",
                       help="directory for results.json, the sequences and the plots "
                            "(default: bench-out/replay)")
    bench.add_argument("--no-plots", dest="bench_no_plots", action="store_true", help="write no plots")
    bench.set_defaults(func=_cmd_bench_replay)
    bench_sub = bench.add_subparsers(dest="bench_command", required=False)
    p = bench_sub.add_parser("codec", help="codec ratio, error and speed on synthetic and real fields")
    p.add_argument("--out", default="bench-out/codec",
                   help="directory for results.json and plots (default: bench-out/codec)")
    p.add_argument("--n", type=int, default=64, help="side of the synthetic n^3 fields (default: 64)")
    p.add_argument("--rels", type=_floats, default=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                   help="tolerances as fractions of each field's value range "
                        "(default: 1e-5,1e-4,1e-3,1e-2,1e-1)")
    p.add_argument("--codecs", default="lorenzo,interp,bounded,zstd,fp16,zfp,sz3",
                   help="comma-separated codecs (default: lorenzo,interp,bounded,zstd,fp16,zfp,sz3)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timings are the best of this many runs (default: 3)")
    p.add_argument("--no-plots", action="store_true", help="write no plots")
    p.set_defaults(func=_cmd_bench_codec)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: 0 on success, 2 on an error (one line on stderr), 128 + the signal's number
    when SIGINT (130) or SIGTERM (143) stops it."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from tierscope.errors import TierscopeError

    try:
        with _interruptible():
            args.func(args)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"tierscope {args.command}: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except (TierscopeError, ValueError, OSError) as exc:
        print(f"tierscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
