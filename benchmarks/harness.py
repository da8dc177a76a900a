"""Reproduce docs/benchmarks-harness.md: the replay of playback, scanning and wandering over a LAN and a WAN
link against tierscope and every baseline (same as ``tierscope bench``), then copy the plots to docs/img.

    python benchmarks/harness.py                      # the documented run (laptop preset, ~15 min)
    python benchmarks/harness.py --views 20           # any ``tierscope bench`` option overrides
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tierscope.cli import main

OUT = "bench-out/harness"
DOCUMENTED = ["--preset", "laptop", "--pattern", "playback,scanning,wandering", "--views", "50",
              "--think", "100", "--tol", "1e-3", "--link", "1gbit,0.1ms", "--link", "100mbit,20ms",
              "--out", OUT]

if __name__ == "__main__":
    status = main(["bench", *DOCUMENTED, *sys.argv[1:]])
    img = Path(__file__).resolve().parent.parent / "docs" / "img"
    img.mkdir(exist_ok=True)
    for png in sorted(Path(OUT).glob("*.png")):
        shutil.copy(png, img / f"bench-{png.name}")
    sys.exit(status)
