"""The block service: origin reads and encoding behind one synchronous call.

The HTTP app runs it in a bounded thread pool; the embedded transport calls it in-process. Both see the
same counters, so a test can ask either one how many blocks were read from the origin.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from tierscope import codec
from tierscope.errors import DatasetNotFoundError
from tierscope.grid import BlockIndex
from tierscope.metadata import DatasetInfo, check_tol
from tierscope.store.origin import Origin

__all__ = ["BlockResult", "BlockService", "PURPOSES"]

PURPOSES = ("user", "prefetch")


@dataclass(frozen=True)
class BlockResult:
    """One encoded block and where its time went on the server."""

    frame: bytes
    tier: str  # which server tier answered: "origin" until the server grows L3/L4
    read_s: float
    encode_s: float


class BlockService:
    """Serves encoded blocks of a set of origins, keyed by dataset name.

    The default codec is the error-bounded ``lorenzo``: within ``tol`` of the stored values, and
    lossless (zstd) at ``tol=0`` or for integer data.
    """

    def __init__(self, origins: Iterable[Origin], codec_name: str = "lorenzo") -> None:
        self._origins: dict[str, Origin] = {}
        for origin in origins:
            if origin.name in self._origins:
                raise ValueError(f"two stores are both named {origin.name!r}")
            self._origins[origin.name] = origin
        codec.get_codec(codec_name)
        self.codec_name = codec_name
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._tiers: Counter[str] = Counter()
        self._read_s = 0.0
        self._encode_s = 0.0

    def datasets(self) -> list[str]:
        return sorted(self._origins)

    def origin(self, name: str) -> Origin:
        try:
            return self._origins[name]
        except KeyError:
            known = ", ".join(self.datasets()) or "none"
            raise DatasetNotFoundError(
                f"no dataset named {name!r} is served here (datasets: {known})"
            ) from None

    def info(self, name: str) -> DatasetInfo:
        return self.origin(name).info()

    def block(
        self,
        dataset: str,
        variable: str,
        index: BlockIndex,
        tol: float = 0.0,
        codec_name: str | None = None,
        purpose: str = "user",
    ) -> BlockResult:
        """Read one block from its origin and encode it at ``tol``."""
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
        tol = check_tol(tol)
        codec_name = codec_name or self.codec_name
        codec.get_codec(codec_name)
        origin = self.origin(dataset)
        t0 = time.perf_counter()
        raw = origin.read_block(variable, index)
        t1 = time.perf_counter()
        frame = codec.encode(raw, tol, codec=codec_name)
        t2 = time.perf_counter()
        with self._lock:
            self._requests[purpose] += 1
            self._tiers["origin"] += 1
            self._read_s += t1 - t0
            self._encode_s += t2 - t1
        return BlockResult(frame=frame, tier="origin", read_s=t1 - t0, encode_s=t2 - t1)

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "requests": {p: self._requests[p] for p in PURPOSES},
                "served_by": dict(self._tiers),
                "origin_reads": self._tiers["origin"],
                "read_s": self._read_s,
                "encode_s": self._encode_s,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._requests.clear()
            self._tiers.clear()
            self._read_s = self._encode_s = 0.0

    def close(self) -> None:
        for origin in self._origins.values():
            origin.close()
