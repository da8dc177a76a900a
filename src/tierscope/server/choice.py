"""Which representation of a block reaches a client first: a view is never slower than its link.

Encoding a block at ``tol`` makes it several times smaller but costs CPU time. Over a fast link, or with
a slow or busy encoder, the raw block (lossless, so within every tol) arrives sooner; a frame at a tighter
tol already in L3 may too. The service measures its encode throughput per thread and the compression
ratio per (variable, tol); the client reports the throughput it measured on the link (the
``X-Tierscope-Link`` header, bytes per second). For one block of ``raw`` bytes missing from L3:

- encode it:          raw / (encode_bps * parallel) + raw / ratio / link
- send it raw:        raw / link
- send a tighter one: len(frame) / link

``parallel`` is the number of encodes that can run at once (the user pool, at most the cores): a view's
blocks encode side by side while the link carries them one after the other. Without a link figure, or
before anything was measured, the block is encoded as asked.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["Costs", "Ewma"]

MAX_RATIOS = 256  # (variable, tol) pairs whose compression ratio is remembered; the least recent go


class Ewma:
    """An exponentially weighted mean: recent measurements count most."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha, self.value = alpha, None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


class Costs:
    """Measured encode throughput and ratios; the cheapest way to send a block. Owned by the service's
    event loop (no lock)."""

    def __init__(self, threads: int) -> None:
        self.parallel = max(1, min(threads, os.cpu_count() or 1))
        self.encode_bps = Ewma()  # raw bytes per second of one encode
        self._ratios: OrderedDict[Hashable, Ewma] = OrderedDict()

    def encoded(self, key: Hashable, raw_nbytes: int, frame_nbytes: int, seconds: float) -> None:
        """One encode of ``key``'s (variable, tol) took ``seconds`` and gave ``frame_nbytes``."""
        if seconds > 0:
            self.encode_bps.add(raw_nbytes / seconds)
        ratio = self._ratios.pop(key, None) or Ewma()
        ratio.add(raw_nbytes / max(frame_nbytes, 1))
        self._ratios[key] = ratio
        while len(self._ratios) > MAX_RATIOS:
            self._ratios.popitem(last=False)

    def encode_s(self, key: Hashable, raw_nbytes: int, link_bps: float | None) -> float | None:
        """Expected seconds to encode a block and send the frame; None before anything was measured."""
        ratio = self._ratios.get(key)
        if link_bps is None or self.encode_bps.value is None or ratio is None:
            return None
        return raw_nbytes / (self.encode_bps.value * self.parallel) + raw_nbytes / ratio.value / link_bps

    def send_raw(self, key: Hashable, raw_nbytes: int, link_bps: float | None) -> bool:
        """Whether the raw block arrives before an encoded one would."""
        encode_s = self.encode_s(key, raw_nbytes, link_bps)
        return encode_s is not None and raw_nbytes / link_bps < encode_s

    def send_tighter(self, frame_nbytes: int, key: Hashable, raw_nbytes: int, link_bps: float | None) -> bool:
        """Whether a cached frame of ``frame_nbytes`` at a tighter tol arrives before an encoded one would."""
        encode_s = self.encode_s(key, raw_nbytes, link_bps)
        return encode_s is not None and frame_nbytes / link_bps <= encode_s
