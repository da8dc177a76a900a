"""The replay's figures, from ``results.json``'s records pooled over sequences.

Drawn on matplotlib ``Figure`` objects, not pyplot, so a notebook's backend is left alone.

Per condition (link and swept value), one panel per access pattern:
- ``latency_*.png``: mean view latency per system, whiskers up to the p95 (the zarr-http baseline in orange);
- ``hits_*.png``: where each system's view blocks came from (L1, L2, L3, L4, origin), stacked shares;
- ``stages_*.png``: per-stage time of user views (queue, network, server, decode; ms per view, summed
  over the view's blocks) for the systems that report stages, with the mean latency as a dot.
Per swept variable with more than one value (``link`` when several links ran, or ``--sweep``'s variable):
- ``sweep_VAR.png``: mean latency (top) and L1+L2 hit ratio (bottom) against the value, a line per system.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tierscope.bench.replay import summarise
from tierscope.bench.systems import BASELINE, STAGES, TIERS

__all__ = ["plot_results"]

_TIER_COLOURS = {"l1": "#1b9e77", "l2": "#66c2a5", "l3": "#7570b3", "l4": "#b3aede", "origin": "#d95f02"}
_STAGE_COLOURS = {"queue": "#999999", "network": "#e7298a", "server": "#7570b3", "decode": "#1b9e77"}


def _system_colour(system: str) -> str:
    """tierscope configurations green, its raw/fp16 transfer variants light green, the baseline orange."""
    if system.startswith("tierscope"):
        return "#1b9e77"
    return {"raw": "#66c2a5", "fp16": "#66c2a5", BASELINE: "#d95f02"}.get(system, "#bbbbbb")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _condition(row: dict[str, Any]) -> tuple[str, str]:
    sweep = ",".join(f"{k}={v}" for k, v in row["sweep"].items())
    return row["link"], sweep


def _panels(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    return patterns, systems


def _figure(npanels: int, title: str):  # noqa: ANN202 - matplotlib figure and axes
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend is left alone

    fig = Figure(figsize=(max(5.0, 4.2 * npanels), 4.2))
    axes = fig.subplots(1, npanels, squeeze=False, sharey=True)
    fig.suptitle(title)
    return fig, axes[0]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _latency(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    patterns, _ = _panels(rows)
    fig, axes = _figure(len(patterns), f"view latency (mean, whisker to p95): {title}")
    for ax, pattern in zip(axes, patterns, strict=True):
        rs = [r for r in rows if r["pattern"] == pattern]
        x = range(len(rs))
        means = [r["mean_ms"] for r in rs]
        ax.bar(x, means, yerr=[[0] * len(rs), [max(r["p95_ms"] - r["mean_ms"], 0) for r in rs]],
               color=[_system_colour(r["system"]) for r in rs],
               capsize=3)
        ax.set_xticks(list(x), [r["system"] for r in rs], rotation=60, ha="right", fontsize=8)
        ax.set_title(pattern)
        ax.set_yscale("log")
    axes[0].set_ylabel("ms per view (log)")
    return _save(fig, path)


def _stacked(rows: list[dict[str, Any]], title: str, path: Path, field: str, parts: tuple[str, ...],
             colours: dict[str, str], ylabel: str, latency_dots: bool) -> Path:
    patterns, _ = _panels(rows)
    fig, axes = _figure(len(patterns), title)
    for ax, pattern in zip(axes, patterns, strict=True):
        rs = [r for r in rows if r["pattern"] == pattern and r[field] is not None]
        x = list(range(len(rs)))
        bottom = [0.0] * len(rs)
        for part in parts:
            values = [r[field][part] or 0.0 for r in rs]
            ax.bar(x, values, bottom=bottom, color=colours[part], label=part)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        if latency_dots and rs:
            ax.plot(x, [r["mean_ms"] for r in rs], "ko", markersize=4, label="mean latency")
        ax.set_xticks(x, [r["system"] for r in rs], rotation=60, ha="right", fontsize=8)
        ax.set_title(pattern)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def _sweep(rows: list[dict[str, Any]], var: str, values: list[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    patterns, systems = _panels(rows)
    fig = Figure(figsize=(max(5.0, 4.2 * len(patterns)), 6.5))
    axes = fig.subplots(2, len(patterns), squeeze=False, sharex=True)
    fig.suptitle(f"latency and L1+L2 hit ratio against {var}")
    for col, pattern in enumerate(patterns):
        for system in systems:
            rs = {v: r for r in rows if r["pattern"] == pattern and r["system"] == system
                  for v in [_value(r, var)]}
            xs = [v for v in values if v in rs]
            if not xs:
                continue
            axes[0][col].plot(xs, [rs[v]["mean_ms"] for v in xs], marker="o", label=system)
            if rs[xs[0]]["stage_ms"] is not None:  # systems with tiers
                axes[1][col].plot(xs, [rs[v]["hit_ratio"]["l1"] + rs[v]["hit_ratio"]["l2"] for v in xs],
                                  marker="o", label=system)
        axes[0][col].set_title(pattern)
        axes[0][col].set_yscale("log")
        axes[1][col].set_ylim(0, 1.05)
        axes[1][col].set_xlabel(var)
    axes[0][0].set_ylabel("mean ms per view (log)")
    axes[1][0].set_ylabel("L1+L2 hit ratio")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path)


def _value(row: dict[str, Any], var: str) -> str:
    return row["link"] if var == "link" else str(row["sweep"].get(var))


def plot_results(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Write the figures for ``results`` (run_bench's dictionary) into ``out``; return their paths."""
    out = Path(out)
    rows = summarise(results["records"])
    written = []
    conditions = list(dict.fromkeys(_condition(r) for r in rows))
    for cond in conditions:
        rs = [r for r in rows if _condition(r) == cond]
        title = f"link {cond[0]}" + (f", {cond[1]}" if cond[1] else "")
        slug = _slug(f"{cond[0]}_{cond[1]}")
        written.append(_latency(rs, title, out / f"latency_{slug}.png"))
        written.append(_stacked(rs, f"where view blocks came from: {title}", out / f"hits_{slug}.png",
                                "hit_ratio", TIERS, _TIER_COLOURS, "share of blocks", latency_dots=False))
        if any(r["stage_ms"] is not None for r in rs):
            written.append(_stacked(rs, f"per-stage time of user views: {title}", out / f"stages_{slug}.png",
                                    "stage_ms", STAGES, _STAGE_COLOURS, "ms per view (summed over blocks)",
                                    latency_dots=True))
    swept = {"link": list(dict.fromkeys(r["link"] for r in rows))}
    for r in rows:
        for var, value in r["sweep"].items():
            swept.setdefault(var, [])
            if str(value) not in swept[var]:
                swept[var].append(str(value))
    for var, values in swept.items():
        if len(values) > 1:  # the other variable held at its first value
            held = [r for r in rows if (r["sweep"] == rows[0]["sweep"] if var == "link"
                                        else r["link"] == rows[0]["link"])]
            written.append(_sweep(held, var, values, out / f"sweep_{_slug(var)}.png"))
    return written
