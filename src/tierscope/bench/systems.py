"""The systems the replay compares: tierscope in its configurations, and what users would pick instead.

Every system answers one question the same way: "give me the values of this view" (``read(view)``), after
a cold ``setup`` that opens the variable. Systems that have tiers also give cumulative counters
(``snapshot``); the replay turns the difference across one view into that view's blocks per tier and stage
times (``view_counters``).

Systems (``make_system(name)``):

- ``tierscope``: all four tiers and prefetch ``auto``; ``tierscope-TIERS`` with TIERS four 0/1 digits for
  L1, L2, L3, L4 (``tierscope-1010``: L1 and L3 on, L2 and L4 off, i.e. size 0);
- ``raw`` / ``fp16``: tierscope with every tier on and the block server sending ``raw`` (uncompressed) or
  ``fp16`` frames instead of error-bounded ones;
- ``zarr-http``: ``xr.open_zarr`` of the same zarr store served as static files over HTTP (fsspec) through
  the same emulated link, computed on the same Dask client: what a user does today;
- ``zarr-local``: ``xr.open_zarr`` of the local store on the same Dask client (also the reference values);
- ``tiledb`` / ``hdf5``: direct slice reads of the ingested TileDB array / HDF5 dataset in this process;
- ``copy-first``: copy the whole store over the link first (its size at the link rate, reported as setup
  time), then ``zarr-local`` reads.

The tierscope systems and ``zarr-http`` reach their servers through the ``Testbed``'s link proxies;
everything runs on loopback.
"""

from __future__ import annotations

import abc
import json
import re
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from tierscope.bench.link import Link, LinkProxy
from tierscope.bench.patterns import View
from tierscope.server.app import AppThread

__all__ = [
    "BASELINE",
    "STAGES",
    "SYSTEMS",
    "TIERS",
    "DataPaths",
    "StaticServer",
    "System",
    "TierSizes",
    "Testbed",
    "make_system",
    "parse_systems",
    "view_counters",
]

TIERS = ("l1", "l2", "l3", "l4", "origin")
STAGES = ("queue", "network", "server", "decode")
BASELINE = "zarr-http"
SYSTEMS = ("tierscope", "tierscope-live", "tierscope-progressive", "tierscope-TIERS", "raw", "fp16", "zarr-http", "zarr-local", "tiledb", "hdf5",
           "copy-first")
_TIER_COMBO = re.compile(r"tierscope-([01]{4})")
_CONTROL_TIMEOUT = 30
ALL_LEVELS = 16  # coarse levels to ask for: ingest writes as many as fit


@dataclass(frozen=True)
class DataPaths:
    """One dataset in the three store formats, and the variable the views select."""

    zarr: Path
    tiledb: Path | None
    hdf5: Path | None
    variable: str = "u"
    block: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return self.zarr.name.removesuffix(".zarr")

    def encoded(self, tol: float) -> Path:
        """The zarr store pre-encoded at ``tol`` (``tierscope ingest --tol``; made once, then kept), under
        the same dataset name."""
        from tierscope.store import ingest

        out = self.zarr.parent / f"encoded-tol{tol!r}" / self.zarr.name
        marker = out.parent / ".complete-levels"
        if not marker.exists():
            out.parent.mkdir(exist_ok=True)
            ingest(self.zarr, out, self.block, tol=tol, overwrite=True, levels=ALL_LEVELS)
            marker.touch()
        return out


@dataclass(frozen=True)
class TierSizes:
    """Capacities of the tiers when on (worker tiers per worker), the replacement policy, prefetch mode."""

    l1: str = "64MiB"
    l2: str = "128MiB"
    l3: str = "256MiB"
    l4: str = "512MiB"
    policy: str = "distance"
    prefetch: str = "auto"


class StaticServer(AppThread):
    """A directory served as static files (with index pages, which fsspec lists) by aiohttp in a thread."""

    def __init__(self, directory: Path, route: str) -> None:
        super().__init__(name="bench-static")
        self.directory, self.route = Path(directory), "/" + route.strip("/")

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_static(self.route, self.directory, show_index=True)
        return app


class Testbed:
    """What the systems of one run share: the data, the Dask client, and servers behind one emulated link.

    Block servers (one per codec) and the static file server start on first use, each behind its own
    ``LinkProxy`` with this bed's ``link`` (no proxy when ``link`` is None). ``close`` stops them all.
    """

    def __init__(self, data: DataPaths, client: Any, link: Link | None) -> None:
        self.data, self.client, self.link = data, client, link
        self._block_servers: dict[tuple[str, Path], tuple[Any, str]] = {}
        self._static: tuple[StaticServer, str] | None = None
        self._closers: list[Any] = []

    def _behind_link(self, host: str, port: int, direct_url: str) -> str:
        if self.link is None:
            return direct_url
        proxy = LinkProxy.for_link(self.link, host, port).start()
        self._closers.append(proxy.stop)
        return proxy.url

    def block_server(self, codec: str, store: Path) -> tuple[Any, str]:
        """(the ServerProcess, its base URL through the link) serving ``store`` with ``codec`` frames."""
        key = (codec, store)
        if key not in self._block_servers:
            server = ServerProcess(store, codec)
            self._closers.append(server.stop)
            self._block_servers[key] = server, self._behind_link(server.host, server.port, server.url)
        return self._block_servers[key]

    def static_url(self) -> str:
        """URL of the zarr store served as static files, through the link."""
        if self._static is None:
            server = StaticServer(self.data.zarr, self.data.zarr.name).start()
            self._closers.append(server.stop)
            self._static = server, self._behind_link(server.host, server.port, server.url)
        return f"{self._static[1]}/{self.data.zarr.name}"

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServerProcess:
    """``tierscope serve`` in its own process, as deployed next to the storage: its encodes do not share
    the GIL (or the event loop) with the client, the link proxy or the baselines' servers."""

    def __init__(self, store: Path, codec: str) -> None:
        import subprocess
        import sys
        import tempfile

        self._errors = tempfile.TemporaryFile(mode="w+")  # a pipe nobody drains could block the server
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tierscope", "serve", str(store), "--host", "127.0.0.1", "--port", "0",
             "--codec", codec, "--l3", "0", "--l4", "0", "--prefetch", "off"],
            stdout=subprocess.PIPE, stderr=self._errors, text=True,
        )
        line = self._process.stdout.readline() if self._process.stdout else ""  # then it prints nothing
        match = re.match(r"serving (http://[^/]+)/datasets/", line)
        if match is None:
            self.stop()
            self._errors.seek(0)
            raise RuntimeError(f"tierscope serve did not start: {(line + self._errors.read()).strip()[-500:]}")
        self.url = match.group(1)
        self.host, _, port = self.url.removeprefix("http://").rpartition(":")
        self.port = int(port)

    def stop(self) -> None:
        import subprocess

        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._errors.close()


def _http_json(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    """A control request straight to a server (never through the link: it is not user traffic)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=_CONTROL_TIMEOUT) as response:
        return json.loads(response.read())


def _store_nbytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- systems ----------------------------------------------------------------------------------------


class System(abc.ABC):
    """One way of reading views. ``setup`` opens cold and returns its seconds; ``read`` returns values."""

    name: str
    bounded = True  # values within the view's tol of the stored ones (fp16 is not error-bounded)

    @abc.abstractmethod
    def setup(self, bed: Testbed, tol: float) -> float:
        """Open the variable from a cold start; the seconds it took count as setup time."""

    @abc.abstractmethod
    def read(self, view: View) -> np.ndarray:
        """The view's values as a NumPy array."""

    def snapshot(self) -> dict[str, Any] | None:
        """Cumulative counters (tier systems only); ``view_counters`` diffs two of them."""
        return None

    def teardown(self) -> None:
        """Release what ``setup`` opened."""


class _XarraySystem(System):
    """Views as ``DataArray.isel(...).values``."""

    dataset: Any = None
    array: Any = None

    def _open(self, dataset: Any, variable: str) -> None:
        self.dataset, self.array = dataset, dataset[variable]

    def read(self, view: View) -> np.ndarray:
        return np.asarray(self.array.isel(view.isel(self.array.dims)).values)

    def teardown(self) -> None:
        if self.dataset is not None:
            self.dataset.close()
        self.dataset = self.array = None


class TierscopeSystem(_XarraySystem):
    """tierscope over HTTP through the link: L1/L2 sized by ``connect``, L3/L4 by ``PUT /config``.

    ``stored``: a lossy view is served from the store pre-encoded at its tol (``tierscope ingest --tol``,
    no encode on the server), else from the raw store, encoding on demand."""

    def __init__(self, name: str, tiers: str = "1111", codec: str = "lorenzo",
                 sizes: TierSizes | None = None, stored: bool = True) -> None:
        if not re.fullmatch(r"[01]{4}", tiers):
            raise ValueError(f"tiers must be four 0/1 digits for L1, L2, L3, L4, got {tiers!r}")
        self.name, self.tiers, self.codec, self.stored = name, tiers, codec, stored
        self.bounded = codec != "fp16"
        self.sizes = sizes or TierSizes()
        self.bed: Testbed | None = None
        self._server: Any = None

    def _size(self, tier: str) -> str | int:
        on = self.tiers["l1 l2 l3 l4".split().index(tier)] == "1"
        return getattr(self.sizes, tier) if on else 0

    def setup(self, bed: Testbed, tol: float) -> float:
        import xarray as xr

        import tierscope
        from tierscope.server.service import parse_size

        self.bed = bed
        store = bed.data.encoded(tol) if self.stored and tol > 0 else bed.data.zarr
        self._server, url = bed.block_server(self.codec, store)
        t0 = time.perf_counter()
        _http_json("PUT", f"{self._server.url}/config", {
            "l3": parse_size(self._size("l3"), "l3"), "l4": parse_size(self._size("l4"), "l4"),
            "policy": self.sizes.policy, "prefetch": self.sizes.prefetch,
        })
        with warnings.catch_warnings():  # connect replaces the previous system's plugins on purpose
            warnings.filterwarnings("ignore", "Scheduler already contains a plugin", UserWarning)
            tierscope.connect(bed.client, l1=self._size("l1"), l2=self._size("l2"),
                              policy=self.sizes.policy, prefetch=self.sizes.prefetch)
        self._open(xr.open_dataset(f"{url}/datasets/{bed.data.name}", engine="tierscope", tol=tol),
                   bed.data.variable)
        return time.perf_counter() - t0

    def snapshot(self) -> dict[str, Any]:
        import tierscope

        assert self.bed is not None, "setup() first"
        worker = tierscope.stats(self.bed.client)
        server = _http_json("GET", f"{self._server.url}/stats")
        return _counters(worker, server)

    def teardown(self) -> None:
        """Close the dataset, then leave the block server idle and empty: the prefetch it queued for this
        system's views would otherwise go on reading and encoding into the next system's first views
        (another system may use another server on the same cores), and its tiers would hold memory."""
        super().teardown()
        if self._server is not None:
            _http_json("PUT", f"{self._server.url}/config", {"prefetch": "off", "l3": 0, "l4": 0})


class ProgressiveSystem(TierscopeSystem):
    """tierscope's progressive views (``tierscope.progressive``): a coarse level first, level 0 last.
    ``first_picture_s`` is when the first part arrived (the harness reports it as time to first picture);
    a view's latency is its time to full resolution."""

    first_picture_s: float | None = None

    def read(self, view: View) -> np.ndarray:
        import tierscope

        self.first_picture_s = None
        part = None
        for part in tierscope.progressive(self.array.isel(view.isel(self.array.dims))):
            if self.first_picture_s is None:
                self.first_picture_s = time.perf_counter()
        return np.asarray(part.values)


def _total_s(summary: dict[str, float]) -> float:
    """Seconds summed over a Distribution summary (count x mean; 0 when it holds no figures)."""
    return summary.get("count", 0) * summary.get("mean_ms", 0.0) / 1e3


def _counters(worker: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    """The cumulative figures a view's counters are differences of."""
    total = worker["total"]
    queue = (worker.get("scheduler") or {}).get("queue") or {}
    return {
        "l1_hits": total["l1"]["hits"], "l1_misses": total["l1"]["misses"],
        "l2_hits": total["l2"]["hits"], "l2_misses": total["l2"]["misses"],
        "fetches": total["fetches"],
        "network_s": total["stage_s"].get("network", 0.0),
        "server_s": total["stage_s"].get("server", 0.0),
        "decode_s": total["stage_s"].get("decode", 0.0),
        "queue_n": queue.get("count", 0),
        "queue_s": _total_s(queue),
        "served_by": dict(server["served_by"]),
    }


def view_counters(before: dict[str, Any] | None, after: dict[str, Any] | None,
                  nblocks: int) -> tuple[dict[str, float], dict[str, float | None] | None]:
    """One view's blocks per tier and stage seconds, from snapshots taken right before and after it.

    Without snapshots (systems with no tiers) every block came from the origin and stages are unknown.
    Worker L1/L2 counters count user lookups only. Blocks that missed L2 were fetched from the server;
    they are split over L3/L4/origin in the proportions the server answered requests in the window (exact
    when no worker prefetch request was answered during the view). ``network`` and ``server`` are the
    workers' fetch round trips without / with only the server's read + encode (from its response
    headers), scaled to the user's share of the fetches in the window; ``queue`` is the scheduler's wait
    from a graph's arrival to each load's start (None when it recorded no load); ``decode`` is the
    window's decode time (prefetch decodes still running when the view started included). Stage times
    are summed over the view's blocks, which load in parallel, so their sum can exceed the latency.
    """
    if before is None or after is None:
        return {**dict.fromkeys(TIERS, 0.0), "origin": float(nblocks)}, None
    d = {k: after[k] - before[k] for k in after if k != "served_by"}
    served = {t: after["served_by"].get(t, 0) - before["served_by"].get(t, 0) for t in ("l3", "l4", "origin")}
    remote = d["l2_misses"]
    answered = sum(served.values())
    blocks = {"l1": float(d["l1_hits"]), "l2": float(d["l2_hits"])}
    for tier in ("l3", "l4", "origin"):
        share = served[tier] / answered if answered else float(tier == "origin")
        blocks[tier] = remote * share
    user = min(1.0, remote / d["fetches"]) if d["fetches"] else 0.0
    stages = {
        "queue": d["queue_s"] if d["queue_n"] > 0 else None,
        "network": d["network_s"] * user,
        "server": d["server_s"] * user,
        "decode": d["decode_s"],
    }
    return blocks, stages


class ZarrHttpSystem(_XarraySystem):
    """xarray + zarr over HTTP (fsspec) + the Dask client: the store as static files through the link."""

    name = "zarr-http"

    def setup(self, bed: Testbed, tol: float) -> float:
        import xarray as xr

        url = bed.static_url()
        t0 = time.perf_counter()
        self._open(xr.open_zarr(url, consolidated=False, chunks={}), bed.data.variable)
        return time.perf_counter() - t0


class ZarrLocalSystem(_XarraySystem):
    """xarray + zarr from the local disk + the Dask client."""

    name = "zarr-local"

    def setup(self, bed: Testbed, tol: float) -> float:
        import xarray as xr

        t0 = time.perf_counter()
        self._open(xr.open_zarr(bed.data.zarr, consolidated=False, chunks={}), bed.data.variable)
        return time.perf_counter() - t0


class CopyFirstSystem(ZarrLocalSystem):
    """Copy the whole store over the link first (size x 8 / bandwidth + one round trip), then read locally."""

    name = "copy-first"

    def setup(self, bed: Testbed, tol: float) -> float:
        transfer = 0.0
        if bed.link is not None:
            transfer = _store_nbytes(bed.data.zarr) * 8 / bed.link.bandwidth_bps + 2 * bed.link.delay_s
        return transfer + super().setup(bed, tol)


class TileDBSystem(System):
    """Direct TileDB slice reads of the ingested array (one query per view), in this process."""

    name = "tiledb"

    def setup(self, bed: Testbed, tol: float) -> float:
        import tiledb

        from tierscope.store.tiledb import context

        if bed.data.tiledb is None:
            raise ValueError("the tiledb system needs the TileDB copy of the data (DataPaths.tiledb)")
        t0 = time.perf_counter()
        self.variable = bed.data.variable
        self._array = tiledb.open(str(bed.data.tiledb / self.variable), ctx=context())
        return time.perf_counter() - t0

    def read(self, view: View) -> np.ndarray:
        return self._array[_selection(view)][self.variable]

    def teardown(self) -> None:
        self._array.close()


class HDF5System(System):
    """Direct h5py slice reads of the ingested HDF5 dataset, in this process."""

    name = "hdf5"

    def setup(self, bed: Testbed, tol: float) -> float:
        import h5py

        if bed.data.hdf5 is None:
            raise ValueError("the hdf5 system needs the HDF5 copy of the data (DataPaths.hdf5)")
        t0 = time.perf_counter()
        self._file = h5py.File(bed.data.hdf5, "r")
        self._dataset = self._file[bed.data.variable]
        return time.perf_counter() - t0

    def read(self, view: View) -> np.ndarray:
        return self._dataset[_selection(view)]

    def teardown(self) -> None:
        self._file.close()


def _selection(view: View) -> tuple[int | slice, ...]:
    return tuple(slice(*s) if isinstance(s, tuple) else s for s in view.sels)


def make_system(name: str, sizes: TierSizes | None = None) -> System:
    """A fresh system by its ``--systems`` name."""
    sizes = sizes or TierSizes()
    if name in ("tierscope", "tierscope-live"):
        return TierscopeSystem(name, "1111", sizes=sizes, stored=name == "tierscope")
    if name == "tierscope-progressive":
        return ProgressiveSystem(name, "1111", sizes=sizes)
    if match := _TIER_COMBO.fullmatch(name):
        return TierscopeSystem(name, match.group(1), sizes=sizes)
    if name in ("raw", "fp16"):
        return TierscopeSystem(name, "1111", codec=name, sizes=sizes, stored=False)
    simple = {"zarr-http": ZarrHttpSystem, "zarr-local": ZarrLocalSystem, "copy-first": CopyFirstSystem,
              "tiledb": TileDBSystem, "hdf5": HDF5System}
    if name not in simple:
        raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)} "
                         f"(TIERS = four 0/1 digits for L1 L2 L3 L4, e.g. tierscope-1010)")
    return simple[name]()


def parse_systems(text: str) -> list[str]:
    """``"tierscope,zarr-http,..."`` as a list of validated names (duplicates are an error)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--systems names no system")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"system {name!r} is listed twice")
        seen.add(name)
        make_system(name)
    return names

