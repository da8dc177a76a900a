"""Codec base class and the registry that maps a frame's short codec name to its class.

Frames name their codec by a short string ("raw", "zstd"), so decoding needs a lookup from
that name to code.  New codecs (e.g. an error-bounded lossy one) plug in by subclassing
:class:`Codec` as a frozen dataclass and calling :func:`register_codec`; ``encode``/``decode``
then pick them up without any change to the frame layer.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .device import to_host

if TYPE_CHECKING:
    import numpy as np

    from .frame import FrameHeader

__all__ = ["Codec", "codec_ids", "get_codec", "register_codec", "register_missing"]

_MAX_NAME_LEN = 64

C = TypeVar("C", bound="type[Codec]")


class Codec(abc.ABC):
    """Base class of tierscope codecs, in the style of ``numcodecs.abc.Codec``.

    Subclasses are frozen dataclasses whose fields are their constructor parameters, so that
    ``get_config``/``from_config`` and the per-frame ``params`` come for free.  Class attributes:

    - ``name``: short registry key written into every frame (``"zstd"``);
    - ``codec_id``: numcodecs-style identifier used in configs (``"tierscope.zstd"``);
    - ``lossless``: whether decoding reproduces the input bit for bit (then any ``tol`` holds).

    ``encode_payload`` receives a C-contiguous numeric array and the caller's absolute error
    bound ``tol``; it returns the payload (any bytes-like object) and the JSON-serialisable
    params to store in the frame header.  ``decode_payload`` receives the payload and the
    validated header (whose ``params`` are those stored at encode time) and must return a
    C-contiguous, writeable array of exactly ``header.dtype`` and ``header.shape``, raising
    :class:`~tierscope.errors.FrameError` for a payload it cannot decode.
    """

    name: ClassVar[str]
    codec_id: ClassVar[str]
    lossless: ClassVar[bool] = True

    @abc.abstractmethod
    def encode_payload(self, array: np.ndarray, tol: float) -> tuple[bytes, dict[str, Any]]:
        """Compress ``array`` (C-contiguous) honouring ``tol``; return ``(payload, params)``."""

    @abc.abstractmethod
    def decode_payload(self, payload: memoryview, header: FrameHeader) -> np.ndarray:
        """Rebuild the array described by ``header`` from ``payload``."""

    def encode_device(self, array: Any, tol: float, xp: Any) -> tuple[bytes, dict[str, Any]]:
        """Encode an ``xp`` array (NumPy or CuPy; for CuPy, ``array`` may be on the host or the device).

        The default copies it to the host and calls :meth:`encode_payload`; codecs whose array
        stages run on the device override it and must produce the same payload byte for byte.
        """
        return self.encode_payload(to_host(xp, array), tol)

    def decode_device(self, payload: memoryview, header: FrameHeader, xp: Any) -> Any:
        """Rebuild the array as an ``xp`` array (NumPy or CuPy).

        The default decodes on the CPU and transfers; codecs whose reconstruction runs on the
        device override it (and must return the same values bit for bit).  Device arrays have
        the native byte order of ``header.dtype``.
        """
        out = self.decode_payload(payload, header)
        return xp.asarray(out.astype(out.dtype.newbyteorder("="), copy=False))

    def get_config(self) -> dict[str, Any]:
        """numcodecs-style config: ``{"id": codec_id, **constructor parameters}``."""
        config: dict[str, Any] = {"id": self.codec_id}
        if dataclasses.is_dataclass(self):
            for field in dataclasses.fields(self):
                config[field.name] = getattr(self, field.name)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        """Instantiate from ``get_config()`` output; the ``id`` must name this class."""
        config = dict(config)
        codec_id = config.pop("id", cls.codec_id)
        if codec_id != cls.codec_id:
            raise ValueError(f"config id {codec_id!r} does not match codec {cls.codec_id!r}")
        return cls(**config)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Codec:
        """Instance able to decode a frame whose header stores ``params``.

        Only keys that are constructor fields are passed on, so a codec may store extra
        decode-time information (e.g. a quantisation step) next to its parameters.
        """
        if not dataclasses.is_dataclass(cls):
            return cls()
        names = {field.name for field in dataclasses.fields(cls) if field.init}
        return cls(**{key: value for key, value in params.items() if key in names})

    @classmethod
    def from_kwargs(cls, params: dict[str, Any]) -> Codec:
        """Instance for ``encode(..., **params)``: unknown keywords are a ValueError naming them."""
        if dataclasses.is_dataclass(cls):
            names = sorted(field.name for field in dataclasses.fields(cls) if field.init)
            unknown = sorted(set(params) - set(names))
            if unknown:
                accepted = ", ".join(names) if names else "none"
                raise ValueError(
                    f"codec {cls.name!r} does not accept parameter(s) {', '.join(unknown)}; "
                    f"accepted: {accepted}"
                )
        return cls(**params)


_lock = threading.Lock()
_REGISTRY: dict[str, type[Codec]] = {}
_MISSING: dict[str, str] = {}  # codec name -> why it is unavailable (its package does not import)


def register_missing(name: str, package: str, reason: str) -> None:
    """Record that codec ``name`` exists but needs ``package``, which did not import.

    It stays out of :func:`codec_ids`; :func:`get_codec` then says what to install instead of
    calling the name unknown.
    """
    with _lock:
        _MISSING[name] = f"codec {name!r} needs the package {package!r}, which is not importable ({reason})"


def register_codec(codec_cls: C) -> C:
    """Make ``codec_cls`` available under ``codec_cls.name``; usable as a class decorator.

    Duplicate names (or codec ids) are a ValueError rather than a silent override, so two
    plug-ins cannot quietly change how existing frames decode.
    """
    if not (isinstance(codec_cls, type) and issubclass(codec_cls, Codec)):
        raise TypeError(f"register_codec expects a Codec subclass, got {codec_cls!r}")
    name = getattr(codec_cls, "name", None)
    codec_id = getattr(codec_cls, "codec_id", None)
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME_LEN:
        raise ValueError(f"codec class {codec_cls.__name__} needs a non-empty str `name`")
    if not isinstance(codec_id, str) or not codec_id:
        raise ValueError(f"codec class {codec_cls.__name__} needs a non-empty str `codec_id`")
    with _lock:
        if name in _REGISTRY:
            raise ValueError(
                f"a codec named {name!r} is already registered ({_REGISTRY[name].__qualname__})"
            )
        for other in _REGISTRY.values():
            if other.codec_id == codec_id:
                raise ValueError(
                    f"codec id {codec_id!r} is already registered by {other.__qualname__}"
                )
        _REGISTRY[name] = codec_cls
    return codec_cls


def get_codec(name: str) -> type[Codec]:
    """The codec class registered as ``name``; the error lists what is available."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        if isinstance(name, str) and name in _MISSING:
            raise ValueError(_MISSING[name]) from None
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ValueError(f"unknown codec {name!r}; known codecs: {known}") from None


def codec_ids() -> tuple[str, ...]:
    """Sorted short names of the registered codecs (the values a frame's ``codec`` may take)."""
    return tuple(sorted(_REGISTRY))
