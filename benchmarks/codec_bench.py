"""Codec benchmark (same as ``tierscope bench codec``): ratio, PSNR, max error / tol, speeds.

    python benchmarks/codec_bench.py --out bench-out/codec --n 128
"""

from __future__ import annotations

import sys

from tierscope.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "codec", *sys.argv[1:]]))
