"""Codec benchmark: ratio, PSNR, max error / tol, encode and decode speed, side by side.

Every codec runs on the same fields at the same tolerances in one process (one core: the
NumPy paths are single-threaded), so ratios compare directly; absolute speeds only mean
something with the machine named.  Fields: synthetic turbulence (the ``tierscope sample``
spectral generator, k^-5/3), a smooth field (four sines + 1e-3 noise), and the real
``hgt_djf.nc`` geopotential-height data shipped with ``eofs`` when it is installed.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..codec import codec_ids, decode, encode

__all__ = [
    "DEFAULT_CODECS",
    "DEFAULT_RELS",
    "bench_fields",
    "format_table",
    "measure",
    "plot_results",
    "run_codec_bench",
]

DEFAULT_RELS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_CODECS = ("lorenzo", "interp", "bounded", "zstd", "fp16", "zfp", "sz3")
BOUNDED = frozenset({"lorenzo", "interp", "bounded", "zfp", "sz3", "zstd", "raw"})


def turbulence(n: int, seed: int = 0) -> np.ndarray:
    """One float32 ``n^3`` k^-5/3 field from the sample-data generator (unit std)."""
    from tierscope.store.sample import sample_field

    return sample_field((n, n, n), "u", seed)


def smooth(n: int, seed: int = 0) -> np.ndarray:
    """Four sines over a periodic ``n^3`` box plus 1e-3 Gaussian noise, float32."""
    g = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y, z = np.meshgrid(g, g, g, indexing="ij", sparse=True)
    field = np.sin(x) + np.sin(2 * y + 0.3) + np.sin(3 * z + 1.0) + np.sin(x + y + z)
    noise = np.random.default_rng(seed).standard_normal(field.shape) * 1e-3
    return (field + noise).astype(np.float32)


def hgt_djf() -> np.ndarray | None:
    """eofs' winter 500 hPa geopotential height (65 x 29 x 49, float64), or None without eofs."""
    try:
        import eofs
        import xarray as xr
    except ImportError:
        return None
    path = Path(eofs.__file__).parent / "examples" / "example_data" / "hgt_djf.nc"
    if not path.exists():
        return None
    with xr.open_dataset(path, decode_times=False) as ds:
        return np.ascontiguousarray(ds["z"].values.squeeze(), dtype=np.float64)


def bench_fields(n: int) -> dict[str, np.ndarray]:
    """The benchmark's fields at ``n^3`` (the real dataset keeps its own shape)."""
    fields = {"turbulence": turbulence(n), "smooth": smooth(n)}
    real = hgt_djf()
    if real is not None:
        fields["hgt_djf"] = real
    return fields


def _best_time(fn: Any, repeats: int) -> tuple[float, Any]:
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(x: np.ndarray, codec: str, tol: float, repeats: int = 3) -> dict[str, Any]:
    """One record: sizes, error statistics and best-of-``repeats`` speeds of ``codec`` on ``x``."""
    enc_s, frame = _best_time(lambda: encode(x, tol, codec=codec), repeats)
    dec_s, out = _best_time(lambda: decode(frame), repeats)
    finite = np.isfinite(x)
    err = np.abs(out[finite].astype(np.float64) - x[finite].astype(np.float64))
    max_err = float(err.max()) if err.size else 0.0
    value_range = float(x[finite].max() - x[finite].min()) if finite.any() else 0.0
    mse = float(np.mean(err**2)) if err.size else 0.0
    # None in the record: exact (infinite PSNR), or a constant field reproduced inexactly (no range to
    # compare with); max_err tells the two apart.
    psnr = None if mse == 0 or value_range == 0 else 20 * math.log10(value_range) - 10 * math.log10(mse)
    return {
        "codec": codec,
        "tol": tol,
        "nbytes": int(x.nbytes),
        "frame_nbytes": len(frame),
        "ratio": x.nbytes / len(frame),
        "max_err": max_err,
        "max_err_over_tol": max_err / tol if tol > 0 else (0.0 if max_err == 0 else math.inf),
        "psnr_db": psnr,
        "encode_mb_s": x.nbytes / enc_s / 1e6,
        "decode_mb_s": x.nbytes / dec_s / 1e6,
        "bounded": codec in BOUNDED,
    }


def run_codec_bench(
    out_dir: str | Path,
    n: int = 64,
    rels: Sequence[float] = DEFAULT_RELS,
    codecs: Sequence[str] = DEFAULT_CODECS,
    repeats: int = 3,
    fields: dict[str, np.ndarray] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Run every codec on every field at every ``rel * value range``; write results.json (+ PNGs)."""
    if n < 2:
        raise ValueError(f"field size n must be >= 2, got {n}")
    if not rels or any(not (math.isfinite(r) and r > 0) for r in rels):
        raise ValueError(f"relative tolerances must be finite and > 0, got {list(rels)}")
    available = set(codec_ids())
    skipped = [c for c in codecs if c not in available]
    run = [c for c in codecs if c in available]
    if not run:
        raise ValueError(f"none of the codecs {list(codecs)} is available; known: {sorted(available)}")
    fields = bench_fields(n) if fields is None else fields
    records = []
    for name, x in fields.items():
        finite = x[np.isfinite(x)]
        value_range = float(finite.max() - finite.min())
        for rel in rels:
            for codec in run:
                record = measure(x, codec, rel * value_range, repeats)
                record.update(field=name, shape=list(x.shape), dtype=x.dtype.str, rel_tol=rel)
                records.append(record)
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "n": n,
        "codecs": run,
        "skipped_codecs": skipped,
        "records": records,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if plots:
        plot_results(results, out)
    return results


def plot_results(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """ratio_vs_tol.png and decode_speed.png: one panel per field, one line per codec."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend is left alone

    records = results["records"]
    names = list(dict.fromkeys(r["field"] for r in records))
    written = []
    for metric, label, filename in (("ratio", "compression ratio", "ratio_vs_tol.png"),
                                    ("decode_mb_s", "decode MB/s (1 core)", "decode_speed.png")):
        fig = Figure(figsize=(5 * len(names), 4))
        axes = fig.subplots(1, len(names), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            for codec in results["codecs"]:
                rows = [r for r in records if r["field"] == name and r["codec"] == codec]
                ax.loglog([r["rel_tol"] for r in rows], [r[metric] for r in rows], marker="o", label=codec)
            ax.set(title=name, xlabel="tol / value range", ylabel=label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the records (ratio, max err / tol, PSNR, speeds)."""
    lines = ["| field | rel tol | codec | ratio | max err/tol | PSNR dB | enc MB/s | dec MB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["records"]:
        psnr = f"{r['psnr_db']:.1f}" if r["psnr_db"] is not None else "inf" if r["max_err"] == 0 else "n/a"
        lines.append(f"| {r['field']} | {r['rel_tol']:g} | {r['codec']} | {r['ratio']:.1f} | "
                     f"{r['max_err_over_tol']:.4f} | {psnr} | {r['encode_mb_s']:.0f} | "
                     f"{r['decode_mb_s']:.0f} |")
    return "\n".join(lines)
