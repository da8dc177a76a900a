"""Tests of tierscope.codec: frame layout, lossless round trips, malformed-frame handling."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import sys
import zlib
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.frames import mutate_frame
from tierscope.codec import (
    Codec,
    FrameHeader,
    codec_ids,
    decode,
    encode,
    get_codec,
    read_header,
    register_codec,
)
from tierscope.codec import registry as registry_mod
from tierscope.codec.frame import MAGIC, MAX_HEADER_NBYTES
from tierscope.codec.lossless import RawCodec, ZstdCodec
from tierscope.errors import ChecksumError, FrameError

CODECS = ["raw", "zstd"]

numeric_dtypes = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64)),
    hnp.complex_number_dtypes(endianness="?", sizes=(64, 128)),
)
numeric_arrays = numeric_dtypes.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=8, min_side=0, max_side=3))
)
FUZZ = settings(
    max_examples=75,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def assert_exact(out: np.ndarray, expected: Any) -> None:
    """Bit-exact equality, including dtype byte order and NaN payloads."""
    expected = np.asarray(expected)
    assert isinstance(out, np.ndarray)
    assert out.dtype == expected.dtype and out.dtype.str == expected.dtype.str
    assert out.shape == expected.shape
    assert out.tobytes() == expected.tobytes()
    assert out.flags.c_contiguous and out.flags.writeable and out.flags.owndata


def make_frame(header: dict[str, Any] | bytes, payload: bytes = b"", version: int = 2) -> bytes:
    """Hand-built frame following the documented layout (header checksum right), for malformed-input
    tests."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<4sBII", MAGIC, version, len(raw), zlib.crc32(raw)) + raw + payload


def good_header(payload: bytes, **overrides: Any) -> dict[str, Any]:
    header = {
        "codec": "raw",
        "dtype": "<f8",
        "shape": [len(payload) // 8],
        "tol": 0.0,
        "params": {},
        "checksum": zlib.crc32(payload),
        "payload_nbytes": len(payload),
    }
    header.update(overrides)
    return header


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("codec", CODECS)
@FUZZ
@given(array=numeric_arrays)
def test_round_trip_random(codec: str, array: np.ndarray) -> None:
    assert_exact(decode(encode(array, codec=codec)), array)


@pytest.mark.parametrize("codec", CODECS)
@FUZZ
@given(array=numeric_arrays, data=st.data())
def test_round_trip_non_contiguous(codec: str, array: np.ndarray, data: st.DataObject) -> None:
    view = array.T
    if array.ndim:
        steps = data.draw(st.lists(st.sampled_from([1, 2, -1, -2]), min_size=1, max_size=1))
        view = view[:: steps[0]]
    assert_exact(decode(encode(view, codec=codec)), view)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "array",
    [
        np.float64(3.5),
        np.array(7, dtype=">i2"),
        np.zeros((0,), dtype="<f4"),
        np.zeros((3, 0, 2), dtype=">c8"),
        np.array([np.nan, np.inf, -np.inf, -0.0, 1.0]),
        np.array([np.nan, np.inf], dtype=">f2"),
        np.arange(24, dtype=">i4").reshape(2, 3, 4),
        np.arange(24, dtype="<u8").reshape(2, 3, 4)[:, ::2, ::-1],
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.array([True, False, True]),
        (np.arange(6) + 1j * np.arange(6)).astype(">c16"),
        np.ones((1,) * 8, dtype=np.int8),
    ],
    ids=lambda a: f"{a.dtype.str}{a.shape}",
)
def test_round_trip_edge_cases(codec: str, array: np.ndarray) -> None:
    assert_exact(decode(encode(array, codec=codec)), array)


def test_nan_payload_bits_preserved() -> None:
    quiet_nan_with_payload = np.array([0x7FF8_0000_DEAD_BEEF], dtype=np.uint64).view(np.float64)
    for codec in CODECS:
        assert_exact(decode(encode(quiet_nan_with_payload, codec=codec)), quiet_nan_with_payload)


def test_python_inputs_and_buffer_kinds() -> None:
    frame = encode([[1, 2], [3, 4]])
    expected = np.array([[1, 2], [3, 4]])
    for buf in (frame, bytearray(frame), memoryview(frame)):
        assert_exact(decode(buf), expected)
        assert read_header(buf).shape == (2, 2)
    assert_exact(decode(encode(2.5)), np.array(2.5))


def test_decode_returns_independent_copy() -> None:
    source = np.arange(10.0)
    frame = bytearray(encode(source, codec="raw"))
    out = decode(frame)
    out[:] = -1
    assert_exact(decode(frame), source)
    assert not np.shares_memory(out, source)


def test_encode_does_not_modify_input() -> None:
    source = np.arange(10.0)
    encode(source, codec="raw")
    assert source.flags.writeable
    np.testing.assert_array_equal(source, np.arange(10.0))


# ---------------------------------------------------------------------------- header / layout


@pytest.mark.parametrize("codec", CODECS)
def test_header_fields_and_layout(codec: str) -> None:
    array = np.arange(12, dtype=">i4").reshape(3, 4)
    frame = encode(array, tol=0.25, codec=codec)
    header = read_header(frame)
    assert isinstance(header, FrameHeader)
    assert header.codec == codec
    assert header.version == 2
    assert header.dtype == np.dtype(">i4") and header.dtype.str == ">i4"
    assert header.shape == (3, 4)
    assert header.tol == 0.25
    assert header.params == ({"level": 3} if codec == "zstd" else {})
    assert header.decoded_nbytes == 48
    assert header.payload_offset + header.payload_nbytes == len(frame)
    assert header.checksum == zlib.crc32(frame[header.payload_offset :])

    # The documented layout, parsed independently of the implementation.
    magic, version, header_nbytes, header_crc = struct.unpack_from("<4sBII", frame)
    assert (magic, version) == (b"TSF1", 2)
    assert header.payload_offset == 13 + header_nbytes
    assert header_crc == zlib.crc32(frame[13 : 13 + header_nbytes])
    obj = json.loads(frame[13 : 13 + header_nbytes].decode("utf-8"))
    assert obj == {
        "codec": codec,
        "dtype": ">i4",
        "shape": [3, 4],
        "tol": 0.25,
        "params": header.params,
        "checksum": header.checksum,
        "payload_nbytes": header.payload_nbytes,
    }
    if codec == "raw":
        assert frame[header.payload_offset :] == array.tobytes()

    with pytest.raises(dataclasses.FrozenInstanceError):
        header.codec = "raw"  # type: ignore[misc]


def test_zstd_level_recorded_and_tol_recorded_exactly() -> None:
    header = read_header(encode(np.zeros(4), tol=1e-7, codec="zstd", level=9))
    assert header.params == {"level": 9}
    assert header.tol == 1e-7


def test_read_header_skips_payload_checks() -> None:
    frame = bytearray(encode(np.arange(100.0)))
    frame[-1] ^= 0xFF
    assert read_header(frame).shape == (100,)  # cheap: no checksum, no decompression
    with pytest.raises(ChecksumError):
        decode(frame)


def test_zstd_compresses_smooth_array() -> None:
    smooth = np.sin(np.linspace(0, 20, 100_000)).astype(np.float32)
    smooth = np.round(smooth, 3)
    raw = read_header(encode(smooth, codec="raw"))
    packed = read_header(encode(smooth, codec="zstd"))
    assert raw.payload_nbytes == smooth.nbytes
    assert packed.payload_nbytes < raw.payload_nbytes / 2
    assert_exact(decode(encode(smooth, codec="zstd")), smooth)


# --------------------------------------------------------------------------- malformed frames


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("position", [0, -1, "middle"])
def test_payload_corruption_is_checksum_error(codec: str, position: Any) -> None:
    frame = bytearray(encode(np.arange(1000.0), codec=codec))
    offset = read_header(frame).payload_offset
    index = {0: offset, -1: len(frame) - 1, "middle": (offset + len(frame)) // 2}[position]
    frame[index] ^= 0x01
    with pytest.raises(ChecksumError, match="checksum"):
        decode(frame)


def test_checksum_error_is_a_frame_error() -> None:
    assert issubclass(ChecksumError, FrameError) and issubclass(FrameError, ValueError)


@pytest.mark.parametrize("codec", CODECS)
def test_truncated_frames(codec: str) -> None:
    frame = encode(np.arange(50.0), codec=codec)
    offset = read_header(frame).payload_offset
    for cut in (len(frame) - 1, offset, offset - 1, 9, 5, 0):
        with pytest.raises(FrameError, match="truncated"):
            decode(frame[:cut])
        with pytest.raises(FrameError, match="truncated"):
            read_header(frame[:cut])


@pytest.mark.parametrize("codec", CODECS)
def test_trailing_bytes(codec: str) -> None:
    frame = encode(np.arange(5), codec=codec)
    with pytest.raises(FrameError, match="trailing"):
        decode(frame + b"\x00")
    with pytest.raises(FrameError, match="trailing"):
        read_header(frame + frame)


def test_bad_magic() -> None:
    frame = encode(np.arange(5))
    with pytest.raises(FrameError, match="magic"):
        decode(b"TSF2" + frame[4:])
    with pytest.raises(FrameError, match="magic"):
        read_header(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)


def test_bad_version() -> None:
    frame = encode(np.arange(5))
    for version in (0, 3, 255):
        with pytest.raises(FrameError, match="version"):
            decode(frame[:4] + bytes([version]) + frame[5:])


def test_huge_header_length() -> None:
    frame = struct.pack("<4sBII", MAGIC, 2, MAX_HEADER_NBYTES + 1, 0) + b"{}"
    with pytest.raises(FrameError, match="header length"):
        read_header(frame)
    with pytest.raises(FrameError, match="header length"):
        decode(struct.pack("<4sBII", MAGIC, 2, 0xFFFFFFFF, 0))


@pytest.mark.parametrize(
    "raw_header",
    [
        b"{not json",
        b"\xff\xfe\xfd",
        b"",
        b"[" * 60_000 + b"]" * 4_000,
        b'{"a": 1' + b"1" * 5000 + b"}",
    ],
    ids=["syntax", "not-utf8", "empty", "deep-nesting", "huge-int"],
)
def test_garbage_header(raw_header: bytes) -> None:
    with pytest.raises(FrameError, match="JSON"):
        decode(make_frame(raw_header))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"codec": "nope"}, "unknown codec 'nope'.*raw.*zstd"),
        ({"codec": 3}, "codec"),
        ({"dtype": "|O"}, "dtype"),
        ({"dtype": "<U3"}, "dtype"),
        ({"dtype": "garbage"}, "dtype"),
        ({"dtype": "<i4,<i4"}, "dtype"),
        ({"dtype": "<M8[s]"}, "dtype"),
        ({"dtype": 8}, "dtype"),
        ({"shape": [1] * 33}, "ndim"),
        ({"shape": [-1]}, "negative"),
        ({"shape": [1.5]}, "non-integer"),
        ({"shape": [True]}, "non-integer"),
        ({"shape": "4"}, "shape"),
        ({"shape": [2**62, 2**62]}, "too large"),
        ({"tol": -1.0}, "tol"),
        ({"tol": "0"}, "tol"),
        ({"tol": 10**400}, "tol"),
        ({"params": []}, "params"),
        ({"checksum": -1}, "checksum"),
        ({"checksum": 2**32}, "checksum"),
        ({"payload_nbytes": "8"}, "payload_nbytes"),
        ({"payload_nbytes": 9}, "truncated"),
        ({"payload_nbytes": 7}, "trailing"),
        ({"extra": 1}, "unexpected"),
    ],
)
def test_invalid_header_fields(overrides: dict[str, Any], match: str) -> None:
    payload = np.arange(1.0).tobytes()
    frame = make_frame(good_header(payload, **overrides), payload)
    with pytest.raises(FrameError, match=match):
        read_header(frame)
    with pytest.raises(FrameError, match=match):
        decode(frame)


def test_missing_header_key_and_non_object() -> None:
    header = good_header(b"")
    del header["checksum"]
    with pytest.raises(FrameError, match="lacks.*checksum"):
        decode(make_frame(header))
    with pytest.raises(FrameError, match="JSON object"):
        decode(make_frame(b"[1, 2]"))


def test_nan_tol_in_header_rejected() -> None:
    raw = json.dumps(good_header(b"")).replace('"tol": 0.0', '"tol": NaN').encode()
    with pytest.raises(FrameError):
        decode(make_frame(raw))


def test_decoded_size_mismatch_raw() -> None:
    payload = np.arange(2.0).tobytes()  # 16 bytes, but shape says 3 float64
    frame = make_frame(good_header(payload, shape=[3]), payload)
    with pytest.raises(FrameError, match="need 24"):
        decode(frame)


def test_decoded_size_mismatch_zstd() -> None:
    payload = zlib_free_zstd(np.arange(4.0).tobytes())
    for shape in ([3], [5], [4, 2]):
        frame = make_frame(good_header(payload, codec="zstd", shape=shape), payload)
        with pytest.raises(FrameError, match="zstd"):
            decode(frame)


def test_zstd_garbage_payload_with_valid_checksum() -> None:
    for payload in (b"", b"\x00" * 16, b"not zstd at all", zlib_free_zstd(b"x" * 64)[:-3]):
        frame = make_frame(good_header(payload, codec="zstd", shape=[8]), payload)
        with pytest.raises(FrameError):
            decode(frame)


def test_zstd_trailing_frame_in_payload() -> None:
    one = zlib_free_zstd(np.arange(4.0).tobytes())
    payload = one + one
    frame = make_frame(good_header(payload, codec="zstd", shape=[4]), payload)
    with pytest.raises(FrameError, match="more than"):
        decode(frame)


def test_zstd_decompression_bomb_rejected_before_allocation() -> None:
    payload = zlib_free_zstd(b"")
    frame = make_frame(good_header(payload, codec="zstd", shape=[2**40]), payload)
    with pytest.raises(FrameError, match="cannot decode"):
        decode(frame)


def test_zstd_bad_stored_params() -> None:
    payload = zlib_free_zstd(np.arange(1.0).tobytes())
    frame = make_frame(good_header(payload, codec="zstd", params={"level": 99}), payload)
    with pytest.raises(FrameError, match="params"):
        decode(frame)


def zlib_free_zstd(data: bytes) -> bytes:
    """A zstd payload as ZstdCodec writes it (content size present, no zstd checksum)."""
    import zstandard

    return zstandard.ZstdCompressor(level=3, write_checksum=False).compress(data)


@pytest.mark.parametrize("codec", CODECS)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_frames_only_raise_frame_error(codec: str, data: st.DataObject) -> None:
    array = np.linspace(0, 1, 40).reshape(5, 8)
    frame = mutate_frame(encode(array, codec=codec), data)
    try:
        out = decode(frame)
    except FrameError:
        return
    assert isinstance(out, np.ndarray)  # a mutation may still be a valid frame (e.g. in JSON)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_frame_error(blob: bytes) -> None:
    with pytest.raises(FrameError):
        decode(MAGIC + blob)


def test_non_buffer_frame_is_type_error() -> None:
    with pytest.raises(TypeError, match="bytes"):
        decode("TSF1...")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ encode errors


@pytest.mark.parametrize("tol", [-1.0, -1e-300, math.nan, math.inf, -math.inf, "0.1", None, True])
def test_invalid_tol(tol: Any) -> None:
    with pytest.raises(ValueError, match="tol"):
        encode(np.arange(3.0), tol=tol)


def test_valid_tol_types() -> None:
    for tol in (0, 0.0, 1, np.float32(0.5), 1e300):
        assert read_header(encode(np.arange(3.0), tol=tol)).tol == float(tol)


@pytest.mark.parametrize(
    "array",
    [
        np.array([object(), 1], dtype=object),
        np.array(["a", "b"]),
        np.array([b"a"]),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
        np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
        {"not": "an array"},
    ],
    ids=["object", "str", "bytes", "datetime", "structured", "dict"],
)
def test_non_numeric_dtype_rejected(array: Any) -> None:
    with pytest.raises(ValueError, match="dtype"):
        encode(array)


def test_too_many_dims_rejected() -> None:
    with pytest.raises(ValueError, match="33-d"):
        encode(np.zeros((1,) * 33))


def test_unknown_codec_and_params_on_encode() -> None:
    with pytest.raises(ValueError, match="unknown codec 'nope'.*raw.*zstd"):
        encode(np.arange(3), codec="nope")
    with pytest.raises(ValueError, match="does not accept.*lvl.*accepted: level"):
        encode(np.arange(3), codec="zstd", lvl=3)
    with pytest.raises(ValueError, match="does not accept"):
        encode(np.arange(3), codec="raw", level=3)


@pytest.mark.parametrize("level", [23, -(1 << 17) - 1, 2.5, "3", True, None])
def test_zstd_level_validation(level: Any) -> None:
    with pytest.raises(ValueError, match="level"):
        ZstdCodec(level=level)
    with pytest.raises(ValueError, match="level"):
        encode(np.arange(3), codec="zstd", level=level)


def test_zstd_levels_round_trip() -> None:
    array = np.cumsum(np.ones(5000, dtype=np.int64))
    for level in (-5, 1, 19, np.int64(7)):
        frame = encode(array, codec="zstd", level=level)
        assert read_header(frame).params == {"level": int(level)}
        assert_exact(decode(frame), array)


# ----------------------------------------------------------------------------------- devices


def test_gpu_without_cupy_raises_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail everywhere
    with pytest.raises(RuntimeError, match="CuPy"):
        decode(encode(np.arange(3)), device="gpu")


def test_gpu_when_cupy_is_absent() -> None:
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cupy is importable")
    with pytest.raises(RuntimeError, match="not importable"):
        decode(encode(np.arange(3)), device="gpu")


@pytest.mark.parametrize("device", ["tpu", "GPU", "", "cuda"])
def test_unknown_device(device: str) -> None:
    with pytest.raises(ValueError, match="device"):
        decode(encode(np.arange(3)), device=device)


# ---------------------------------------------------------------------------------- registry


def test_builtin_codecs_registered() -> None:
    assert {"raw", "zstd"} <= set(codec_ids())
    assert codec_ids() == tuple(sorted(codec_ids()))
    assert get_codec("raw") is RawCodec and get_codec("zstd") is ZstdCodec
    assert RawCodec.codec_id == "tierscope.raw" and ZstdCodec.codec_id == "tierscope.zstd"
    assert RawCodec.lossless and ZstdCodec.lossless


def test_registry_duplicate_name_rejected() -> None:
    @dataclasses.dataclass(frozen=True)
    class AnotherZstd(ZstdCodec):
        codec_id: ClassVar[str] = "someone.zstd"

    with pytest.raises(ValueError, match="already registered"):
        register_codec(AnotherZstd)
    assert get_codec("zstd") is ZstdCodec


def test_registry_duplicate_codec_id_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))

    @dataclasses.dataclass(frozen=True)
    class Renamed(RawCodec):
        name: ClassVar[str] = "raw2"

    with pytest.raises(ValueError, match="tierscope.raw"):
        register_codec(Renamed)


def test_registry_rejects_non_codecs() -> None:
    with pytest.raises(TypeError):
        register_codec(dict)  # type: ignore[type-var]


def test_get_codec_unknown_lists_known() -> None:
    with pytest.raises(ValueError) as info:
        get_codec("nope")
    message = str(info.value)
    assert "'nope'" in message and "raw" in message and "zstd" in message
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec(["zstd"])  # type: ignore[arg-type]


def test_config_round_trip() -> None:
    codec = ZstdCodec(level=7)
    config = codec.get_config()
    assert config == {"id": "tierscope.zstd", "level": 7}
    assert json.loads(json.dumps(config)) == config
    assert ZstdCodec.from_config(config) == codec
    assert RawCodec.from_config(RawCodec().get_config()) == RawCodec()
    with pytest.raises(ValueError, match="does not match"):
        RawCodec.from_config(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        codec.level = 1  # type: ignore[misc]


@dataclasses.dataclass(frozen=True)
class _QuantizeCodec(Codec):
    """Toy error-bounded lossy codec: the registry path a real lossy codec will use."""

    name: ClassVar[str] = "test-quantize"
    codec_id: ClassVar[str] = "tests.quantize"
    lossless: ClassVar[bool] = False

    def encode_payload(self, array: np.ndarray, tol: float) -> tuple[bytes, dict[str, Any]]:
        step = 2 * tol if tol > 0 else 1.0
        return np.round(array / step).astype("<i8").tobytes(), {"step": step}

    def decode_payload(self, payload: memoryview, header: FrameHeader) -> np.ndarray:
        codes = np.frombuffer(payload, dtype="<i8")
        if codes.size != math.prod(header.shape):
            raise FrameError("quantize payload size mismatch")
        return (codes * header.params["step"]).astype(header.dtype).reshape(header.shape)


def test_plugin_codec_through_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))
    assert register_codec(_QuantizeCodec) is _QuantizeCodec
    assert "test-quantize" in codec_ids()
    array = np.linspace(-3, 3, 101)
    frame = encode(array, tol=0.01, codec="test-quantize")
    header = read_header(frame)
    assert header.codec == "test-quantize" and header.tol == 0.01
    assert header.params == {"step": 0.02}
    out = decode(frame)
    assert out.dtype == array.dtype and out.shape == array.shape and out.flags.writeable
    assert np.max(np.abs(out - array)) <= 0.01 + 1e-12


@pytest.mark.parametrize(("old", "new"), [(b'"<f4"', b'">f4"'), (b'"tol":0.001', b'"tol":0.002')])
def test_an_edited_header_is_a_checksum_error(old: bytes, new: bytes) -> None:
    """A header edit that still parses (byte order, recorded tol) must not decode to wrong values."""
    frame = encode(np.linspace(0, 1, 64, dtype="<f4"), tol=1e-3, codec="lorenzo")
    assert old in frame
    with pytest.raises(ChecksumError, match="header checksum mismatch"):
        decode(frame.replace(old, new))
