"""Where a dataset lives, as a small picklable value, and the per-process transport to it.

``Source`` travels inside every block-load task; each process (the notebook, each Dask worker) turns it
into one shared transport on first use, so connections and embedded services are not re-created per task.
"""

from __future__ import annotations

import abc
import atexit
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

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
    ) -> Fetched:
        """One encoded block; ``session``/``position`` (the current view's blocks) steer server prefetch."""

    def fetch_many(
        self,
        dataset: str,
        variable: str,
        indices: Sequence[BlockIndex],
        tol: float,
        purpose: str = "user",
        session: str | None = None,
        position: Sequence[BlockIndex] | None = None,
    ) -> list[Fetched]:
        """Encoded blocks of one variable, in order (one round trip where possible)."""
        return [self.fetch(dataset, variable, i, tol, purpose, session, position) for i in indices]

    @abc.abstractmethod
    def server_stats(self) -> dict[str, object]: ...

    def close(self) -> None:  # noqa: B027 - transports without resources need nothing
        """Release connections or services."""


@dataclass(frozen=True)
class Source:
    """A served dataset (``kind="http"``: base URL) or a local store (``kind="embedded"``: path, or a
    ``sample://`` URL: a synthetic dataset computed in each process).

    ``token`` is the server's bearer token (it travels with the source to the workers; never printed).
    """

    kind: Literal["http", "embedded"]
    location: str
    dataset: str
    token: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url_or_path: str | os.PathLike[str], token: str | None = None) -> Source:
        """``http(s)://host:port/datasets/NAME``, a path to a local store or a ``sample://NAME?...`` URL.

        ``token`` defaults to the ``TIERSCOPE_TOKEN`` environment variable (HTTP sources only).
        """
        text = os.fspath(url_or_path)
        if text.startswith(("http://", "https://")):
            parts = urlsplit(text)
            segments = [s for s in parts.path.split("/") if s]
            if len(segments) != 2 or segments[0] != "datasets" or parts.query:
                raise ValueError(
                    f"malformed dataset URL {text!r}: expected http://HOST:PORT/datasets/NAME"
                )
            token = token if token is not None else os.environ.get("TIERSCOPE_TOKEN") or None
            return cls("http", f"{parts.scheme}://{parts.netloc}", segments[1], token)
        from tierscope.store.origin import dataset_name, is_synthetic

        if is_synthetic(text):  # a URL, not a path: resolving it would mangle it
            return cls("embedded", text, dataset_name(text))
        path = Path(text).expanduser().resolve()
        return cls("embedded", str(path), dataset_name(path))

    @property
    def url(self) -> str:
        """Where this dataset is, for error messages."""
        if self.kind == "http":
            return f"{self.location}/datasets/{self.dataset}"
        return self.location

    def transport(self) -> Transport:
        """This process's transport for the source (created once, then shared by all threads)."""
        key = (self.kind, self.location, self.token)
        with _lock:
            transport = _transports.get(key)
            if transport is None:
                transport = _transports[key] = self._new_transport()
            return transport

    def _new_transport(self) -> Transport:
        if self.kind == "http":
            from tierscope.client.http import HttpTransport

            return HttpTransport(self.location, token=self.token)
        from tierscope.client.embedded import EmbeddedTransport

        return EmbeddedTransport(self.location)


_lock = threading.Lock()
_transports: dict[tuple[str, str, str | None], Transport] = {}


@atexit.register
def close_transports() -> None:
    """Close this process's transports (at exit, so no connection is left dangling)."""
    with _lock:
        transports = list(_transports.values())
        _transports.clear()
    for transport in transports:
        transport.close()


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    _transports.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
