"""The notebook explorer: ``tierscope.explore(ds["u"])``, sliders over a 2-D view drawn coarse first.

A slider move selects the plane at the new time step and z-slice and runs it as a progressive view
(``tierscope.progressive``): the coarsest level is drawn at once and each finer level replaces it in
place, ending with level 0. Views run one at a time in a background thread, so the notebook stays
responsive; a newer move cancels the older view's remaining levels through ``progressive``'s own
cancellation (the view is registered in the slider's callback, so the older one stops at its next level).

Images are PNG bytes drawn by matplotlib's Agg canvas on a ``Figure`` of their own (no pyplot, no global
state), so the explorer works headless and from a plain script as well as in a notebook. The module
needs ipywidgets and matplotlib (``pip install "tierscope[examples]"``).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from html import escape
from typing import Any

import ipywidgets as widgets
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from tierscope.metadata import time_axis
from tierscope.refine import progressive

__all__ = ["Explorer", "Part", "explore"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """One drawn part of the latest view: its level, the time from the move to the drawn image, and the
    tier figures from the end of the previous view to this part (``tierscope.stats`` totals: ``l1_hits``,
    ``l2_hits``, ``fetches`` from the block server)."""

    level: int
    latency_s: float
    hits: dict[str, int]


@dataclass
class _Job:
    where: dict[str, int]
    parts: Iterator[xr.DataArray]
    started: float


class Explorer(widgets.VBox):
    """Sliders (``sliders``: dim -> ``IntSlider``), the image (``image``, PNG) and a status line
    (``status``); ``parts`` describes the latest view's drawn parts, coarse first. ``wait()`` blocks until
    every move so far is drawn at level 0 (or cancelled by a newer one)."""

    def __init__(self, variable: xr.DataArray, sliders: dict[str, int], fixed: dict[str, int],
                 budget_ms: float | None, cmap: str) -> None:
        self.variable, self.fixed, self.budget_ms, self.cmap = variable, fixed, budget_ms, cmap
        self.sliders = {
            dim: widgets.IntSlider(value=0, min=0, max=n - 1, description=dim)
            for dim, n in sliders.items()
        }
        self.image = widgets.Image(format="png")
        self.status = widgets.HTML()
        self.parts: list[Part] = []
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._running = False
        self._figures: dict[str, int] | None = None  # tier figures after the last drawn part
        super().__init__([*self.sliders.values(), self.image, self.status])
        self._move()  # the first view; a selection progressive cannot map raises here
        for slider in self.sliders.values():
            slider.observe(self._move, names="value")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every view asked for so far is finished; False if ``timeout`` seconds passed."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._running and not self._jobs, timeout)

    def _move(self, change: Any = None) -> None:
        """A slider moved (or the first view): register the new view now, draw it in the background."""
        where = {dim: slider.value for dim, slider in self.sliders.items()}
        selection = self.variable.isel({**self.fixed, **where})
        job = _Job(where, progressive(selection, budget_ms=self.budget_ms), time.perf_counter())
        with self._cond:
            self._jobs.append(job)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._drain, name="tierscope-explore", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    self._running = False
                    self._cond.notify_all()
                    return
                job = self._jobs.popleft()
            try:
                self._show(job)
            except Exception as exc:  # the notebook shows the failure; the explorer takes the next move
                logger.exception("tierscope.explore: the view at %s failed", job.where)
                self.status.value = f"<b>error</b>: {escape(f'{type(exc).__name__}: {exc}')}"

    def _show(self, job: _Job) -> None:
        """Draw each part of one view as it arrives (a cancelled view yields nothing more).

        Tier figures are counted from the end of the previous view, so the first picture waits for no
        statistics round trip."""
        before = self._figures if self._figures is not None else _tier_figures()
        drawn: list[Part] = []
        for part in job.parts:
            level = part.encoding["tierscope_level"]
            self.image.value = self._render(part, job.where, level)
            latency = time.perf_counter() - job.started
            self._figures = _tier_figures()
            hits = {k: v - before[k] for k, v in self._figures.items()}
            drawn.append(Part(level, latency, hits))
            self.parts = list(drawn)
            self.status.value = _status(job.where, drawn)

    def _render(self, part: xr.DataArray, where: dict[str, int], level: int) -> bytes:
        """The part as PNG bytes; coordinates place coarse and fine pixels over the same area."""
        fig = Figure(figsize=(5.5, 4.2), dpi=80)
        ax = fig.add_subplot()
        y, x = part.dims
        image = ax.imshow(part.values, origin="lower", extent=(*_span(part, x), *_span(part, y)),
                          aspect="auto", interpolation="nearest", cmap=self.cmap)
        fig.colorbar(image, ax=ax, label=part.attrs.get("units", ""))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        place = ", ".join(f"{dim}={i}" for dim, i in where.items())
        ax.set_title(f"{part.name} {place} - level {level}" + (" (full resolution)" if level == 0 else ""),
                     fontsize=10)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", pil_kwargs={"compress_level": 1})  # fast: the picture is short-lived
        return buf.getvalue()


def _span(part: xr.DataArray, dim: str) -> tuple[float, float]:
    """The outer cell edges along a dimension, from its (evenly spaced) coordinates, else its indices: a
    coarse level's picture covers the same area as level 0's."""
    numeric = dim in part.coords and part[dim].dtype.kind in "iuf"
    centres = part[dim].values.astype(float) if numeric else np.arange(part.sizes[dim], dtype=float)
    half = (centres[-1] - centres[0]) / (len(centres) - 1) / 2 if len(centres) > 1 else 0.5
    return centres[0] - half, centres[-1] + half


def _tier_figures() -> dict[str, int]:
    """Totals of L1 hits, L2 hits and server fetches: the connected client's workers, else this process."""
    import tierscope

    total = tierscope.stats()["total"]
    return {"l1_hits": total["l1"].get("hits", 0), "l2_hits": total["l2"].get("hits", 0),
            "fetches": total.get("fetches", 0)}


def _status(where: dict[str, int], drawn: list[Part]) -> str:
    last = drawn[-1]
    shown = "level 0 (full resolution)" if last.level == 0 else f"level {last.level}"
    parts = ", ".join(f"level {p.level} {p.latency_s * 1e3:.0f} ms" for p in drawn)
    hits = last.hits
    place = " ".join(f"{dim}={i}" for dim, i in where.items())
    return (f"{escape(place)} &middot; showing {shown} &middot; parts: {parts} &middot; tier hits: "
            f"L1 +{hits['l1_hits']}, L2 +{hits['l2_hits']}, server fetches +{hits['fetches']}")


def explore(
    variable: xr.DataArray,
    *,
    time_dim: str | None = None,
    z_dim: str | None = None,
    budget_ms: float | None = None,
    cmap: str = "RdBu_r",
) -> Explorer:
    """A widget exploring ``variable`` (opened with ``engine="tierscope"``, any ``tol``): sliders for its
    time and z dimensions over a 2-D view of its last two dimensions, drawn coarse first and refined in
    place, and a status line (level shown, tier hits, each part's latency).

    ``time_dim`` defaults to tierscope's time axis (``time``/``t``/``time*``), ``z_dim`` to the first other
    dimension before the plane; further dimensions stay at index 0. ``budget_ms`` goes to
    ``tierscope.progressive``. In a notebook, display the returned widget; in a script, move its
    ``sliders`` and call ``wait()`` before reading ``image.value`` or ``status.value``.
    """
    if not isinstance(variable, xr.DataArray) or variable.ndim < 2:
        raise ValueError("explore shows a 2-D view of a DataArray with at least two dimensions, got "
                         f"{type(variable).__name__} with dims {getattr(variable, 'dims', ())}")
    plane = variable.dims[-2:]
    rest = variable.dims[:-2]
    if time_dim is None:
        axis = time_axis(tuple(str(d) for d in rest))
        time_dim = None if axis is None else rest[axis]
    if z_dim is None:
        z_dim = next((d for d in rest if d != time_dim), None)
    for name, dim in (("time_dim", time_dim), ("z_dim", z_dim)):
        if dim is not None and dim not in rest:
            raise ValueError(f"{name}={dim!r} is not one of {variable.name!r}'s dimensions before its "
                             f"plane {plane}: {rest}")
    if time_dim is not None and time_dim == z_dim:
        raise ValueError(f"time_dim and z_dim are both {time_dim!r}")
    sliders = {d: variable.sizes[d] for d in rest if d in (time_dim, z_dim)}
    fixed = {d: 0 for d in rest if d not in sliders}
    return Explorer(variable, sliders, fixed, budget_ms, cmap)
