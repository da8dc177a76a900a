"""GPU vs one-CPU-core codec throughput, with a bit-for-bit check of every GPU result (issue #3 target).

    python benchmarks/gpu_codec.py --out bench-out/gpu            # needs CuPy 13.x and a CUDA GPU
    python benchmarks/gpu_codec.py --out bench-out/gpu --cpu-only --n 64   # the CPU half, anywhere

For 256^3 float32 blocks (64 MiB) of a k^-5/3 turbulence field and a smooth field, at tol = 1e-3 and 1e-2
of the value range, it times encode and decode (best of ``--repeats``) on one CPU core and on the GPU and
reports GB/s of decoded data. GPU encode takes a host array (as the block server does) and must give the
CPU's frame byte for byte; GPU decode leaves the block in GPU memory (as worker L1 does) and must equal
the CPU decode bit for bit. ``zstd_bound_gb_s`` is the host zstd stage alone: the ceiling on GPU decode
while the entropy stage stays on the host. Prints a table and writes ``gpu_codec.json`` into ``--out``;
exits 1 if any GPU result differs from the CPU one, 2 when no GPU is usable (without ``--cpu-only``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # "one core" means one
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import zstandard  # noqa: E402

from tierscope.bench.codec import smooth, turbulence  # noqa: E402
from tierscope.codec import decode, encode  # noqa: E402
from tierscope.codec.device import import_cupy  # noqa: E402
from tierscope.codec.frame import unpack_frame  # noqa: E402

FIELDS: dict[str, Callable[[int], np.ndarray]] = {"turbulence": turbulence, "smooth": smooth}


def _best(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls (after ``sync``: queued GPU work counts) and the last result."""
    best, result = math.inf, None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, result


def _zstd_seconds(frame: bytes, repeats: int) -> float:
    """Time of the host zstd stage of a decode alone (the part that does not move to the GPU)."""
    _, payload = unpack_frame(frame)
    decompressor = zstandard.ZstdDecompressor()
    return _best(lambda: decompressor.decompress(payload), repeats, lambda: None)[0]


def measure(x: np.ndarray, field: str, rel: float, codec: str, repeats: int, cupy: Any) -> dict[str, Any]:
    """One row: ratio and encode/decode GB/s on the CPU (and the GPU, checked against the CPU)."""
    tol = rel * float(x.max() - x.min())
    gb = x.nbytes / 1e9
    enc_s, frame = _best(lambda: encode(x, tol, codec=codec), repeats, lambda: None)
    dec_s, out = _best(lambda: decode(frame), repeats, lambda: None)
    row: dict[str, Any] = {
        "field": field, "rel": rel, "tol": tol, "codec": codec, "nbytes": int(x.nbytes),
        "frame_nbytes": len(frame), "ratio": x.nbytes / len(frame),
        "max_err_over_tol": float(np.abs(out.astype(np.float64) - x).max()) / tol,
        "cpu_encode_gb_s": gb / enc_s, "cpu_decode_gb_s": gb / dec_s,
        "zstd_bound_gb_s": gb / _zstd_seconds(frame, repeats),
    }
    if cupy is None:
        return row
    sync = cupy.cuda.get_current_stream().synchronize
    encode(x, tol, codec=codec, device="gpu")  # warm-up: kernel compilation, memory pool
    genc_s, gframe = _best(lambda: encode(x, tol, codec=codec, device="gpu"), repeats, sync)
    decode(frame, device="gpu")
    gdec_s, gout = _best(lambda: decode(frame, device="gpu"), repeats, sync)
    row.update({
        "gpu_encode_gb_s": gb / genc_s, "gpu_decode_gb_s": gb / gdec_s,
        "encode_identical": gframe == frame,
        "decode_identical": cupy.asnumpy(gout).tobytes() == out.tobytes(),
    })
    return row


def machine(cupy: Any) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_threads_used": 1, "numpy": np.__version__,
                            "python": platform.python_version()}
    if cupy is not None:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        info.update({"gpu": name.decode() if isinstance(name, bytes) else str(name),
                     "cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()})
    return info


def format_table(rows: list[dict[str, Any]]) -> str:
    """GB/s of decoded data per field / tol / codec; "-" where the GPU was not measured."""
    head = ("field", "rel", "codec", "ratio", "cpu enc", "gpu enc", "cpu dec", "gpu dec", "zstd bound",
            "same")
    lines = ["  ".join(f"{h:>10}" for h in head)]
    for r in rows:
        same = "-" if "gpu_decode_gb_s" not in r else str(r["encode_identical"] and r["decode_identical"])
        cells = [r["field"], f"{r['rel']:g}", r["codec"], f"{r['ratio']:.2f}"]
        for key in ("cpu_encode_gb_s", "gpu_encode_gb_s", "cpu_decode_gb_s", "gpu_decode_gb_s",
                    "zstd_bound_gb_s"):
            cells.append(f"{r[key]:.3f}" if key in r else "-")
        cells.append(same)
        lines.append("  ".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_codec.json")
    parser.add_argument("--n", type=int, default=256, help="block side (256: 64 MiB float32 blocks)")
    parser.add_argument("--rels", default="1e-3,1e-2", help="tolerances as fractions of the value range")
    parser.add_argument("--codecs", default="lorenzo,interp,bounded")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-only", action="store_true", help="measure the CPU only (no GPU needed)")
    args = parser.parse_args(argv)
    if args.n < 2 or args.repeats < 1:
        parser.error(f"--n must be >= 2 and --repeats >= 1, got {args.n} and {args.repeats}")
    rels = [float(v) for v in args.rels.split(",")]
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    cupy = None
    if not args.cpu_only:
        try:
            cupy = import_cupy()
        except RuntimeError as exc:
            print(f"gpu_codec: this benchmark needs CuPy 13.x and a CUDA GPU ({exc}); "
                  "use --cpu-only to measure the CPU alone", file=sys.stderr)
            return 2
    rows = []
    for field, make in FIELDS.items():
        x = make(args.n)
        for rel in rels:
            for codec in codecs:
                rows.append(measure(x, field, rel, codec, args.repeats, cupy))
                print(format_table(rows[-1:]).splitlines()[1], flush=True)
    result = {"machine": machine(cupy), "n": args.n, "block_nbytes": rows[0]["nbytes"] if rows else 0,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_codec.json").write_text(json.dumps(result, indent=2))
    print(f"\n{result['machine']}\n{format_table(rows)}\nwrote {args.out / 'gpu_codec.json'}")
    mismatched = [r for r in rows
                  if "gpu_decode_gb_s" in r and not (r["encode_identical"] and r["decode_identical"])]
    if mismatched:
        print(f"gpu_codec: {len(mismatched)} GPU result(s) differ from the CPU's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
