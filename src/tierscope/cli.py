"""The ``tierscope`` command: sample, ingest, serve, demo."""

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
    from aiohttp import web

    from tierscope.server import BlockService, create_app
    from tierscope.store.origin import open_origin

    service = BlockService([open_origin(path) for path in args.stores])
    for name in service.datasets():
        print(f"serving http://{args.host}:{args.port}/datasets/{name}", flush=True)
    web.run_app(create_app(service), host=args.host, port=args.port, print=None,
                shutdown_timeout=10)


def _cmd_demo(args: argparse.Namespace) -> None:
    from tierscope.demo import run_demo

    run_demo(cache_dir=args.cache_dir, shape=args.shape, block=args.block, workers=args.workers)


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
    p.add_argument("--format", default="zarr", help="output format (zarr)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("serve", help="serve stores over HTTP as a block server")
    p.add_argument("stores", nargs="+", metavar="STORE")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="explore a sample dataset through a local server and cluster")
    p.add_argument("--cache-dir", default=None, help="where the sample dataset is kept")
    p.add_argument("--shape", type=_ints, default=(16, 64, 128, 128), help="T,Z,Y,X")
    p.add_argument("--block", type=_ints, default=(1, 32, 64, 64), help="block shape t,z,y,x")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=_cmd_demo)
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
