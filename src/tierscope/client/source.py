"""Where a dataset lives, as a small picklable value, and the per-process transport to it.

``Source`` travels inside every block-load task; each process (the notebook, each Dask worker) turns it
into one shared transport on first use, so connections and embedded services are not re-created per task.
"""

from __future__ import annotations

import abc
import atexit
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from tierscope.grid import BlockIndex
from tierscope.metadata import DatasetInfo

__all__ = ["Source", "Transport"]


class Transport(abc.ABC):
    """How a process reaches block service: over HTTP, or in-process."""

    @abc.abstractmethod
    def info(self, dataset: str) -> DatasetInfo: ...

    @abc.abstractmethod
    def fetch(
        self, dataset: str, variable: str, index: BlockIndex, tol: float, purpose: str = "user"
    ) -> bytes:
        """One encoded frame."""

    @abc.abstractmethod
    def server_stats(self) -> dict[str, object]: ...

    def close(self) -> None:  # noqa: B027 - transports without resources need nothing
        """Release connections or services."""


@dataclass(frozen=True)
class Source:
    """A served dataset (``kind="http"``: base URL) or a local store (``kind="embedded"``: path)."""

    kind: Literal["http", "embedded"]
    location: str
    dataset: str

    @classmethod
    def parse(cls, url_or_path: str | os.PathLike[str]) -> Source:
        """``http(s)://host:port/datasets/NAME`` or a path to a local store."""
        text = os.fspath(url_or_path)
        if text.startswith(("http://", "https://")):
            parts = urlsplit(text)
            segments = [s for s in parts.path.split("/") if s]
            if len(segments) != 2 or segments[0] != "datasets" or parts.query:
                raise ValueError(
                    f"malformed dataset URL {text!r}: expected http://HOST:PORT/datasets/NAME"
                )
            return cls("http", f"{parts.scheme}://{parts.netloc}", segments[1])
        from tierscope.store.origin import dataset_name

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
        key = (self.kind, self.location)
        with _lock:
            transport = _transports.get(key)
            if transport is None:
                transport = _transports[key] = self._new_transport()
            return transport

    def _new_transport(self) -> Transport:
        if self.kind == "http":
            from tierscope.client.http import HttpTransport

            return HttpTransport(self.location)
        from tierscope.client.embedded import EmbeddedTransport

        return EmbeddedTransport(self.location)


_lock = threading.Lock()
_transports: dict[tuple[str, str], Transport] = {}


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
