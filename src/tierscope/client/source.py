"""Where a dataset lives, as a small picklable value, and the per-process transport to it.

``Source`` travels inside every block-load task; each process (the notebook, each Dask worker) turns it
into one shared transport on first use, so connections and embedded services are not re-created per task.

A local or fsspec store's ``Source`` carries a *version*: a stamp of the store's metadata taken when it was
opened. Transports and block keys include it, so a store rewritten in place is never served from the
state (open file handles, cached blocks) of its previous contents. Open datasets hold their transport
(``acquire``/``release``); the last ``release`` closes it, here and on the Dask workers, so that closing
a dataset lets its files be rewritten.
"""

from __future__ import annotations

import abc
import atexit
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from tierscope.errors import StoreError
from tierscope.grid import BlockIndex
from tierscope.metadata import DatasetInfo

__all__ = ["Fetched", "Source", "Transport"]


@dataclass(frozen=True, slots=True)
class Fetched:
    """One block as block service sent it: the frame, the server tier that answered, its read + encode time.

    The tier and time let the worker split a fetch into network and server stages, and the evaluation
    harness say which tier served each block.
    """

    frame: bytes
    tier: str  # "l3", "l4" or "origin"
    server_s: float


class Transport(abc.ABC):
    """How a process reaches block service: over HTTP, or in-process."""

    @abc.abstractmethod
    def info(self, dataset: str) -> DatasetInfo: ...

    @abc.abstractmethod
    def fetch(
        self,
        dataset: str,
        variable: str,
        index: BlockIndex,
        tol: float,
        purpose: str = "user",
        session: str | None = None,
        position: Sequence[BlockIndex] | None = None,
        *,
        moves: bool = True,
    ) -> Fetched:
        """One encoded block; ``session``/``position`` (the current view's blocks) steer server prefetch.
        ``moves=False``: the request is no view of its own (a progressive view's coarse part), so the
        server moves no position for it (``X-Tierscope-Moves: no``)."""

    def fetch_many(
        self,
        dataset: str,
        variable: str,
        indices: Sequence[BlockIndex],
        tol: float,
        purpose: str = "user",
        session: str | None = None,
        position: Sequence[BlockIndex] | None = None,
        *,
        moves: bool = True,
    ) -> list[Fetched]:
        """Encoded blocks of one variable, in order (one round trip where possible)."""
        return [self.fetch(dataset, variable, i, tol, purpose, session, position, moves=moves)
                for i in indices]

    def fetch_each(
        self,
        dataset: str,
        variable: str,
        indices: Sequence[BlockIndex],
        tol: float,
        purpose: str = "user",
        session: str | None = None,
        position: Sequence[BlockIndex] | None = None,
        *,
        moves: bool = True,
    ) -> Iterator[tuple[BlockIndex, Fetched]]:
        """(index, block) pairs of one variable, each as soon as it arrives, in any order (a transport
        that cannot stream gives them when all arrived)."""
        fetched = self.fetch_many(dataset, variable, indices, tol, purpose, session, position, moves=moves)
        yield from zip((tuple(i) for i in indices), fetched, strict=True)

    @abc.abstractmethod
    def server_stats(self) -> dict[str, object]: ...

    @abc.abstractmethod
    def codec(self) -> str:
        """The codec block service encodes lossy views with (recorded on their variables)."""

    def close(self) -> None:  # noqa: B027 - transports without resources need nothing
        """Release connections or services."""


@dataclass(frozen=True)
class Source:
    """A served dataset (``kind="http"``: base URL) or a store opened in this process (``kind="embedded"``:
    a path, an fsspec URL such as ``memory://`` or ``s3://``, or a ``sample://`` URL: a synthetic dataset
    computed in each process).

    ``token`` is the server's bearer token and ``storage_options`` fsspec's options for a store URL (both
    travel with the source to the workers; never printed). ``version`` stamps the store's metadata at
    opening (None for servers and synthetic datasets): see the module docstring.
    """

    kind: Literal["http", "embedded"]
    location: str
    dataset: str
    token: str | None = field(default=None, repr=False)
    version: str | None = None
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, hash=False)

    @classmethod
    def parse(
        cls,
        url_or_path: str | os.PathLike[str],
        token: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Source:
        """``http(s)://host:port/datasets/NAME``, a local store (a path or ``file://`` URL), a zarr store
        at any other fsspec URL (``memory://``, ``s3://``, ...) or a ``sample://NAME?...`` URL.

        ``token`` defaults to the ``TIERSCOPE_TOKEN`` environment variable (HTTP sources only).
        """
        text = os.fspath(url_or_path)
        scheme = urlsplit(text).scheme if "://" in text else ""
        if scheme in ("http", "https"):
            _no_options(storage_options, "a tierscope server URL")
            return cls._server(text, token)
        from tierscope.store.origin import dataset_name, is_synthetic

        if is_synthetic(text):  # a URL, not a path: resolving it would mangle it
            _no_options(storage_options, "a sample:// URL")
            return cls("embedded", text, dataset_name(text))
        if scheme and scheme != "file":
            options = dict(storage_options or {})
            return cls("embedded", text, dataset_name(text), version=_url_version(text, options),
                       storage_options=options)
        _no_options(storage_options, f"the local store {text!r}")
        path = (_file_url_path(text) if scheme else Path(text)).expanduser().resolve()
        return cls("embedded", str(path), dataset_name(path), version=_path_version(path))

    @classmethod
    def _server(cls, url: str, token: str | None) -> Source:
        parts = urlsplit(url)
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) != 2 or segments[0] != "datasets" or parts.query:
            raise ValueError(f"malformed dataset URL {url!r}: expected http://HOST:PORT/datasets/NAME")
        token = token if token is not None else os.environ.get("TIERSCOPE_TOKEN") or None
        return cls("http", f"{parts.scheme}://{parts.netloc}", segments[1], token)

    def level(self, k: int) -> Source:
        """Level ``k`` of this dataset: the dataset ``NAME@k`` (``tierscope.levels``) of the same server or
        store; level 0 is this source."""
        from tierscope.levels import level_name, split_level

        base, current = split_level(self.dataset)
        if k == 0 or current == k:
            return self
        if current:
            raise ValueError(f"{self.url} names level {current} already; level={k} asks for another")
        return replace(self, dataset=level_name(base, k))

    @property
    def url(self) -> str:
        """Where this dataset is, for error messages (and cache keys: a store's coarse level is
        ``LOCATION#NAME@k``, apart from level 0's blocks)."""
        if self.kind == "http":
            return f"{self.location}/datasets/{self.dataset}"
        return f"{self.location}#{self.dataset}" if "@" in self.dataset else self.location

    @property
    def cache_id(self) -> str:
        """The dataset in cache keys: its URL, and the store version when there is one."""
        return self.url if self.version is None else f"{self.url}@{self.version}"

    def transport(self) -> Transport:
        """This process's transport for the source (created once, then shared by all threads)."""
        with _lock:
            return self._entry().transport

    def acquire(self) -> Transport:
        """The transport, held open until ``release`` (an open dataset holds one)."""
        with _lock:
            entry = self._entry()
            entry.holds += 1
            return entry.transport

    def release(self) -> None:
        """Drop one hold; the last closes the transport here and, for a store, on the Dask workers."""
        key = self._key()
        with _lock:
            entry = _transports.get(key)
            if entry is None or entry.holds == 0:
                return
            entry.holds -= 1
            if entry.holds:
                return
            del _transports[key]
        entry.transport.close()
        if self.kind == "embedded":
            _drop_on_workers(key)

    def _key(self) -> tuple:
        options = None if self.storage_options is None else json.dumps(
            self.storage_options, sort_keys=True, default=repr)
        return (self.kind, self.location, self.token, self.version, options)

    def _entry(self) -> _Entry:
        """This source's transport entry (callers hold ``_lock``)."""
        key = self._key()
        entry = _transports.get(key)
        if entry is None:
            entry = _transports[key] = _Entry(self._new_transport())
        return entry

    def _new_transport(self) -> Transport:
        if self.kind == "http":
            from tierscope.client.http import HttpTransport

            return HttpTransport(self.location, token=self.token)
        from tierscope.client.embedded import EmbeddedTransport

        return EmbeddedTransport(self.location, self.storage_options)


@dataclass
class _Entry:
    transport: Transport
    holds: int = 0  # open datasets of this process using it


def _no_options(storage_options: Mapping[str, Any] | None, what: str) -> None:
    if storage_options is not None:
        raise ValueError(f"storage_options apply to fsspec store URLs (memory://, s3://, ...), not to {what}")


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise ValueError(f"malformed file URL {url!r}: expected file:///ABSOLUTE/PATH")
    return Path(unquote(parts.path))


def _path_version(path: Path) -> str | None:
    """A stamp of a local store's metadata (None when nothing is there: opening it reports that).

    Statting every chunk would cost as much as a read, so only the metadata entries count
    (``_metadata_entries``): a rewrite that replaces chunk files in place and nothing else goes unseen.
    """
    if not path.exists():
        return None
    digest = hashlib.blake2b(digest_size=8)
    for entry in _metadata_entries(path):
        st = entry.stat()
        digest.update(f"{entry}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}\n".encode())
    return digest.hexdigest()


# A directory holding one of these is a zarr group or array, a TileDB array or a TileDB group.
_NODE_MARKERS = ("zarr.json", "__schema", "__tiledb_group.tdb")


def _is_node(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in _NODE_MARKERS)


def _metadata_entries(path: Path) -> Iterator[Path]:
    """The store and, inside each of its zarr/TileDB group and array directories, the direct entries:
    zarr.json files, chunk-tree roots, TileDB's __fragments/__meta/__schema directories (whose times change
    when a write adds to them). An HDF5 file is one entry."""
    yield path
    if not _is_node(path):
        return
    for entry in sorted(path.iterdir()):
        if _is_node(entry):
            yield from _metadata_entries(entry)
        else:
            yield entry


def _url_version(url: str, storage_options: Mapping[str, Any]) -> str:
    """A stamp of a zarr store URL's root ``zarr.json`` (fsspec's ``ukey``: one metadata request)."""
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(url, **storage_options)
        return fs.ukey(f"{root.rstrip('/')}/zarr.json")
    except (OSError, ValueError, ImportError) as exc:  # missing, refused, or an unknown protocol
        raise StoreError(f"cannot open store {url!r} as a zarr v3 dataset: {exc}") from exc


def _drop_on_workers(key: tuple) -> None:
    """Close the Dask workers' transports of a store no open dataset of this process uses."""
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):  # no distributed, or no client: no workers hold it
        return
    if not client.asynchronous and client.status == "running":
        client.run(_drop_transport, key)


def _drop_transport(key: tuple) -> None:
    """Close this process's transport of ``key`` unless an open dataset here holds it."""
    with _lock:
        entry = _transports.get(key)
        if entry is None or entry.holds:
            return
        del _transports[key]
    entry.transport.close()


_lock = threading.Lock()
_transports: dict[tuple, _Entry] = {}


@atexit.register
def close_transports() -> None:
    """Close this process's transports (at exit, so no connection is left dangling)."""
    with _lock:
        entries = list(_transports.values())
        _transports.clear()
    for entry in entries:
        entry.transport.close()


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    _transports.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
