"""Block codecs: the self-describing frame format plus a registry of codecs.

``encode`` turns an N-d numeric array into one self-contained frame (magic, version, JSON
header, checksummed payload) and ``decode`` turns it back.  Its default codec is the block
server's, the error-bounded ``lorenzo``: every value within ``tol``, lossless at ``tol=0`` (pass
``codec="zstd"`` for a plain lossless frame at any ``tol``); ``read_header`` inspects a frame
cheaply.  Both take ``device="cpu"|"gpu"`` (CuPy; ``gpu_available()`` says whether there is
one) and give the same bytes/values on either.  Codecs are looked up by the short name stored
in each frame, so new ones (such as an error-bounded lossy codec) plug in via ``register_codec``
without touching the frame layer.
"""

from __future__ import annotations

from . import lossless as _lossless  # noqa: F401  (registers the built-in "raw" and "zstd")
from . import bounded as _bounded  # noqa: F401  (registers "lorenzo", "interp", "bounded")
from . import baselines as _baselines  # noqa: F401  ("fp16", and "zfp"/"sz3" when importable)
from .device import gpu_available
from .frame import FrameHeader, decode, encode, read_header
from .registry import Codec, codec_ids, get_codec, register_codec

__all__ = [
    "Codec",
    "FrameHeader",
    "codec_ids",
    "decode",
    "encode",
    "get_codec",
    "gpu_available",
    "read_header",
    "register_codec",
]
