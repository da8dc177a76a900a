"""The three origins (zarr v3, TileDB, HDF5) on the same ingested data: identical descriptions, equal
blocks, the same errors, format detection, zarr over fsspec URLs (a real HTTP server on loopback), and
the page-cache drop."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import multiprocessing
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import fsspec
import h5py
import numpy as np
import pytest
import tiledb
import xarray as xr

import tierscope
from tierscope.errors import BlockIndexError, StoreError, VariableNotFoundError
from tierscope.metadata import DatasetInfo
from tierscope.store import ingest
from tierscope.store.hdf5 import HDF5Origin
from tierscope.store.origin import Origin, ZarrOrigin, dataset_name, detect_format, open_origin
from tierscope.store.tiledb import TileDBOrigin, context

# the reanalysis file's "hours since 1-1-1 00:00:0.0" makes xarray warn while decoding either side
pytestmark = pytest.mark.filterwarnings("ignore:Ambiguous reference date string")

SUFFIX = {"zarr": ".zarr", "tiledb": ".tdb", "hdf5": ".h5"}
CLASS = {"zarr": ZarrOrigin, "tiledb": TileDBOrigin, "hdf5": HDF5Origin}
FORMATS = tuple(SUFFIX)


def _odd_attrs() -> dict[str, object]:
    """Attribute values TileDB metadata or HDF5 attributes cannot hold natively."""
    return {
        "flag": True,
        "names": ["a", "b"],
        "nested": {"k": [1, 2]},
        "none": None,
        "empty": [],
        "mixed": [1, 2.5],
        "huge": 2**70,
        "nan": float("nan"),
        "one": [7],
        "text": "héllo",
    }


def _odd_source(path: pathlib.Path) -> pathlib.Path:
    """Strings, a scalar, an auxiliary coordinate, ragged blocks and awkward attributes, as zarr v3."""
    rng = np.random.default_rng(5)
    data = rng.standard_normal((3, 5, 7)).astype(np.float32)
    data[0, 0, :2] = np.nan
    xr.Dataset(
        {
            "field": (("time", "station", "x"), data, _odd_attrs()),
            "label": (("station",), np.array(["n", "sü", "east", "w", ""], dtype=object)),
            "crs": ((), np.int32(4326), {"grid_mapping_name": "latitude_longitude"}),
            "mask": (("station", "x"), rng.integers(0, 2, (5, 7)).astype(np.uint8)),
        },
        coords={
            "time": ("time", np.arange(3, dtype=np.int64), {"units": "days since 2000-01-01"}),
            "station": ("station", np.array(["s0", "s1", "s2", "s3", "s4"], dtype=object)),
            "lon": (("station",), np.linspace(0, 40, 5)),
        },
        attrs=_odd_attrs(),
    ).to_zarr(path, zarr_format=3, consolidated=False)
    return path


@pytest.fixture(scope="module")
def reanalysis() -> pathlib.Path:
    """Real NCEP/NCAR 500 hPa heights (netCDF3) shipped inside the eofs wheel."""
    eofs = pytest.importorskip("eofs")
    return pathlib.Path(eofs.__file__).parent / "examples" / "example_data" / "hgt_djf.nc"


@pytest.fixture(scope="module")
def sources(sample_store, reanalysis, tmp_path_factory) -> dict[str, tuple[pathlib.Path, object]]:
    """name -> (source, block): the sample store, the reanalysis file, and the awkward dataset."""
    odd = _odd_source(tmp_path_factory.mktemp("odd") / "odd.zarr")
    return {
        "turb": (sample_store, (1, 8, 16, 16)),
        "hgt": (reanalysis, (1, 1, 16, 16)),
        "odd": (odd, {"time": 2, "station": 2, "x": 3}),
    }


@pytest.fixture(scope="module")
def stores(sources, tmp_path_factory) -> dict[tuple[str, str], pathlib.Path]:
    """(source name, format) -> the source ingested in that format, each under its own directory."""
    out = {}
    for name, (src, block) in sources.items():
        for fmt in FORMATS:
            folder = tmp_path_factory.mktemp(f"{name}-{fmt}")
            out[name, fmt] = ingest(src, folder / f"{name}{SUFFIX[fmt]}", block, fmt=fmt)
    return out


@pytest.fixture
def origins(stores, request) -> Iterator[dict[str, Origin]]:
    name = request.param
    opened = {fmt: open_origin(stores[name, fmt]) for fmt in FORMATS}
    yield opened
    for origin in opened.values():
        origin.close()


def _described(info: DatasetInfo) -> str:
    """The description as it travels (JSON, NaN spelled out, so NaN attributes compare equal)."""
    return json.dumps(info.to_json(), sort_keys=True)


def _layout(info: DatasetInfo) -> dict[str, tuple]:
    return {n: (v.dims, v.shape, v.dtype, v.block) for n, v in info.variables.items()}


@pytest.mark.parametrize("origins", ["turb", "hgt", "odd"], indirect=True)
def test_formats_describe_the_dataset_identically(origins) -> None:
    for fmt, origin in origins.items():
        assert isinstance(origin, CLASS[fmt])
    zarr_info = origins["zarr"].info()
    for fmt in ("tiledb", "hdf5"):
        info = origins[fmt].info()
        assert info.name == zarr_info.name
        assert _layout(info) == _layout(zarr_info)
        assert _described(info) == _described(zarr_info)


@pytest.mark.parametrize("origins", ["turb", "hgt", "odd"], indirect=True)
def test_every_block_is_equal_across_formats(origins) -> None:
    count = 0
    for name, var in origins["zarr"].info().variables.items():
        for index in var.grid.indices():
            expected = origins["zarr"].read_block(name, index)
            assert expected.shape == tuple(s.stop - s.start for s in var.grid.slices(index))
            for fmt in ("tiledb", "hdf5"):
                block = origins[fmt].read_block(name, index)
                assert block.dtype == expected.dtype and block.shape == expected.shape, (fmt, name)
                np.testing.assert_array_equal(block, expected, err_msg=f"{fmt} {name} {index}")
            count += 1
    assert count == sum(np.prod(v.grid.nblocks) for v in origins["zarr"].info().variables.values())


def test_odd_dataset_keeps_its_details(stores) -> None:
    for fmt in FORMATS:
        with closing(open_origin(stores["odd", fmt])) as origin:
            info = origin.info()
            field = info.variables["field"]
            assert field.block == (2, 2, 3) and field.dtype == np.float32
            # xarray's zarr writer gave the float source a NaN _FillValue, which ingest keeps
            skip = ("nan", "_FillValue")
            assert {k: v for k, v in field.attrs.items() if k not in skip} == {
                **{k: v for k, v in _odd_attrs().items() if k != "nan"},
                "coordinates": "lon",
            }
            assert np.isnan(field.attrs["nan"]) and info.attrs["flag"] is True
            assert info.variables["crs"].shape == () and origin.read_block("crs", ()) == 4326
            assert list(info.coords["station"][0]) == ["s0", "s1", "s2", "s3", "s4"]
            assert list(origin.read_block("label", (2,))) == [""]
            assert np.isnan(origin.read_block("field", (0, 0, 0))[0, 0, :2]).all()


@pytest.fixture(scope="module")
def local_tiers() -> None:
    tierscope.connect(None, l1="32MiB", l2="64MiB")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["turb", "hgt"])
def test_embedded_open_matches_xarray_on_the_source(stores, sources, local_tiers, name, fmt) -> None:
    src = sources[name][0]
    options = {"engine": "zarr", "consolidated": False} if src.is_dir() else {}
    with xr.open_dataset(src, **options) as expected:
        ours = xr.open_dataset(stores[name, fmt], engine="tierscope")
        xr.testing.assert_identical(ours.load(), expected.load())


@pytest.mark.parametrize("fmt", FORMATS)
def test_errors_are_the_usual_classes(stores, fmt) -> None:
    with closing(open_origin(stores["turb", fmt])) as origin:
        with pytest.raises(BlockIndexError, match=re.escape("out of range on axis 1 (0..1)")):
            origin.read_block("u", (0, 2, 0, 0))
        with pytest.raises(BlockIndexError, match="has 3 axes, expected 4"):
            origin.read_block("u", (0, 0, 0))
        with pytest.raises(BlockIndexError, match="out of range on axis 0"):
            origin.read_block("u", (-1, 0, 0, 0))
        with pytest.raises(VariableNotFoundError, match="has no variable 'w' .variables: p, u, v."):
            origin.read_block("w", (0, 0, 0, 0))
        with pytest.raises(VariableNotFoundError):
            origin.read_block("time", (0,))  # coordinates travel inline, never as blocks
    with pytest.raises(StoreError, match="no such file or directory"):
        CLASS[fmt](stores["turb", fmt].with_name("missing" + SUFFIX[fmt]))


def test_format_detection(stores, tmp_path) -> None:
    for fmt in FORMATS:
        assert detect_format(stores["turb", fmt]) == fmt
        assert detect_format(stores["turb", fmt].as_uri()) == fmt
    assert detect_format("http://127.0.0.1:1/turb.zarr") == "zarr"
    expected = "expected a zarr v3 store (a directory with zarr.json), a TileDB group or an HDF5 file"
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a store\n" * 100)
    (tmp_path / "tiny").write_bytes(b"\x89HD")
    for path in (tmp_path / "empty", tmp_path / "notes.txt", tmp_path / "tiny"):
        with pytest.raises(StoreError, match=re.escape(f"cannot open store {str(path)!r}: {expected}")):
            open_origin(path)
    with pytest.raises(StoreError, match="no such file or directory"):
        open_origin(tmp_path / "missing.h5")


def test_hdf5_signature_after_a_user_block(stores, tmp_path) -> None:
    path = tmp_path / "userblock.h5"
    with h5py.File(path, "w", userblock_size=1024) as file:
        file.create_dataset("v", data=np.arange(3))
    assert detect_format(path) == "hdf5"
    with pytest.raises(StoreError, match="has no '_tierscope' attribute: not written by tierscope"):
        open_origin(path)  # an HDF5 file, but not one ingest wrote


def test_corrupt_stores_are_store_errors(stores, tmp_path) -> None:
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(stores["turb", "hdf5"].read_bytes()[:600])
    with pytest.raises(StoreError, match=re.escape(f"cannot open store {str(truncated)!r} as an HDF5")):
        open_origin(truncated)
    bare = tmp_path / "bare.tdb"
    tiledb.group_create(str(bare), ctx=context())
    with pytest.raises(StoreError, match="TileDB group .*bare.tdb.* has no '_tierscope' attribute"):
        open_origin(bare)
    with h5py.File(tmp_path / "bad.h5", "w") as file:
        file.attrs["_tierscope"] = "{not json"
    with pytest.raises(StoreError, match="bad.h5.* has a corrupt '_tierscope' attribute"):
        open_origin(tmp_path / "bad.h5")
    with pytest.raises(StoreError, match="not a TileDB group"):
        TileDBOrigin(stores["turb", "zarr"])


@pytest.mark.parametrize(
    ("location", "name"),
    [
        ("data/turb.zarr", "turb"),
        ("data/turb.tdb", "turb"),
        ("data/turb.tiledb", "turb"),
        ("data/turb.h5", "turb"),
        ("data/turb.hdf5", "turb"),
        ("data/turb", "turb"),
        ("data/.zarr", ".zarr"),
        ("http://127.0.0.1:8000/data/turb.zarr/", "turb"),
        ("s3://bucket/turb.zarr", "turb"),
        ("file:///srv/turb.h5", "turb"),
    ],
)
def test_dataset_names(location: str, name: str) -> None:
    assert dataset_name(location) == name


@pytest.fixture
def http_root(tmp_path) -> Iterator[tuple[str, pathlib.Path]]:
    """A real static file server (``http.server``) on loopback over a temporary directory."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=tmp_path))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def _copy_tree(src: pathlib.Path, dest: pathlib.Path) -> None:
    for file in src.rglob("*"):
        if file.is_file():
            target = dest / file.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())


def _assert_same_origin(origin: Origin, reference: Origin) -> None:
    assert _described(origin.info()) == _described(reference.info())
    for name, var in reference.info().variables.items():
        for index in var.grid.indices():
            np.testing.assert_array_equal(origin.read_block(name, index), reference.read_block(name, index))


def test_zarr_over_http(stores, http_root, caplog) -> None:
    base, root = http_root
    _copy_tree(stores["turb", "zarr"], root / "turb.zarr")
    url = f"{base}/turb.zarr"
    with closing(open_origin(url)) as remote, closing(ZarrOrigin(stores["turb", "zarr"])) as local:
        assert isinstance(remote, ZarrOrigin) and remote.name == "turb" and remote.path is None
        _assert_same_origin(remote, local)
        with caplog.at_level(logging.INFO, logger="tierscope.store.origin"):
            assert remote.drop_page_cache() == 0
        assert f"turb: {url} is remote, it has no local page cache to drop" in caplog.text
    with pytest.raises(StoreError, match=re.escape(f"cannot open store '{base}/none.zarr' as a zarr v3")):
        ZarrOrigin(f"{base}/none.zarr")


def test_zarr_over_memory_and_file_urls(stores) -> None:
    local = stores["turb", "zarr"]
    memory = fsspec.filesystem("memory")
    memory.put(str(local), "/origins-test/turb.zarr", recursive=True)
    try:
        with closing(ZarrOrigin("memory://origins-test/turb.zarr", storage_options={})) as remote:
            with closing(ZarrOrigin(local)) as reference:
                _assert_same_origin(remote, reference)
    finally:
        memory.rm("/origins-test", recursive=True)
    with closing(open_origin(local.as_uri())) as by_file_url:
        assert by_file_url.path == local and by_file_url.name == "turb"
        assert by_file_url.drop_page_cache() == len([p for p in local.rglob("*") if p.is_file()])
    with pytest.raises(ValueError, match="storage_options apply to URLs only"):
        ZarrOrigin(local, storage_options={"anon": True})


@pytest.mark.parametrize("fmt", FORMATS)
def test_drop_page_cache_then_read(stores, fmt) -> None:
    path = stores["hgt", fmt]
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    with closing(open_origin(path)) as origin:
        before = origin.read_block("z", (3, 0, 1, 2))
        assert origin.drop_page_cache() == len(files)
        np.testing.assert_array_equal(origin.read_block("z", (3, 0, 1, 2)), before)


@pytest.mark.parametrize("fmt", ["tiledb", "hdf5"])
def test_concurrent_reads_from_threads(stores, fmt) -> None:
    with closing(open_origin(stores["turb", fmt])) as origin, closing(
        open_origin(stores["turb", "zarr"])
    ) as reference:
        indices = list(origin.info().variables["u"].grid.indices()) * 4
        with ThreadPoolExecutor(8) as pool:
            blocks = list(pool.map(lambda index: origin.read_block("u", index), indices))
        for index, block in zip(indices, blocks, strict=True):
            np.testing.assert_array_equal(block, reference.read_block("u", index))


def _read_in_child(origin: Origin, queue: multiprocessing.Queue) -> None:
    queue.put((os.getpid(), origin.read_block("p", (1, 1, 0, 1)).tobytes()))


# TileDB warns about any fork after a context exists: this test is that the child builds its own
@pytest.mark.filterwarnings("ignore:TileDB is a multithreading library")
@pytest.mark.parametrize("fmt", ["tiledb", "hdf5"])
def test_forked_child_opens_its_own_handles(stores, fmt) -> None:
    with closing(open_origin(stores["turb", fmt])) as origin:
        expected = origin.read_block("p", (1, 1, 0, 1))  # the parent's handle is open before the fork
        fork = multiprocessing.get_context("fork")
        queue = fork.Queue()
        child = fork.Process(target=_read_in_child, args=(origin, queue))
        child.start()
        pid, payload = queue.get(timeout=60)
        child.join(60)
        assert child.exitcode == 0 and pid == child.pid
        assert payload == expected.tobytes()
        np.testing.assert_array_equal(origin.read_block("p", (1, 1, 0, 1)), expected)


def test_overwrite_replaces_a_store_of_another_format(stores, reanalysis, tmp_path) -> None:
    out = tmp_path / "hgt.store"
    ingest(reanalysis, out, (1, 1, 16, 16), fmt="hdf5")
    assert detect_format(out) == "hdf5"
    ingest(reanalysis, out, (1, 1, 16, 16), fmt="tiledb", overwrite=True)
    assert detect_format(out) == "tiledb"
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    with pytest.raises(FileExistsError, match="is not a zarr, TileDB or HDF5 store; not replacing it"):
        ingest(reanalysis, notes, (1, 1, 16, 16), fmt="hdf5", overwrite=True)
    assert notes.read_text() == "precious"


def test_failed_write_leaves_nothing(tmp_path) -> None:
    src = tmp_path / "clash.zarr"
    data = {"v": (("x",), np.arange(4.0)), "__meta": (("x",), np.arange(4.0))}
    xr.Dataset(data).to_zarr(src, zarr_format=3, consolidated=False)
    with pytest.raises(StoreError, match="variable name '__meta' cannot name a TileDB array in a group"):
        ingest(src, tmp_path / "clash.tdb", {"x": 2}, fmt="tiledb")  # after "v" was written
    assert not (tmp_path / "clash.tdb").exists()
    assert list(tmp_path.iterdir()) == [src]


def test_failed_overwrite_keeps_the_old_store(reanalysis, tmp_path) -> None:
    out = tmp_path / "keep.tdb"
    ingest(reanalysis, out, (1, 1, 16, 16), fmt="tiledb")
    before = TileDBOrigin(out).read_block("z", (0, 0, 0, 0))
    src = tmp_path / "clash.zarr"
    data = {"v": (("x",), np.arange(4.0)), "__meta": (("x",), np.arange(4.0))}
    xr.Dataset(data).to_zarr(src, zarr_format=3, consolidated=False)
    with pytest.raises(StoreError, match="variable name '__meta' cannot name a TileDB array"):
        ingest(src, out, {"x": 2}, fmt="tiledb", overwrite=True)
    np.testing.assert_array_equal(TileDBOrigin(out).read_block("z", (0, 0, 0, 0)), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clash.zarr", "keep.tdb"]


def test_reserved_attribute_name_is_refused(tmp_path) -> None:
    src = tmp_path / "reserved.zarr"
    xr.Dataset({"v": (("x",), np.arange(4.0), {"_tierscope": 1})}).to_zarr(
        src, zarr_format=3, consolidated=False
    )
    for fmt in ("tiledb", "hdf5"):
        with pytest.raises(StoreError, match="attribute name '_tierscope' is reserved"):
            ingest(src, tmp_path / f"out{SUFFIX[fmt]}", {"x": 2}, fmt=fmt)
        assert not (tmp_path / f"out{SUFFIX[fmt]}").exists()


@pytest.mark.parametrize("fmt", ["tiledb", "hdf5"])
def test_cli_ingest_format(stores, reanalysis, tmp_path, fmt) -> None:
    out = tmp_path / f"hgt{SUFFIX[fmt]}"
    command = [sys.executable, "-m", "tierscope.cli", "ingest", str(reanalysis), str(out)]
    result = subprocess.run(
        [*command, "--block", "1,1,16,16", "--format", fmt],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    assert detect_format(out) == fmt
    with closing(open_origin(out)) as origin, closing(open_origin(stores["hgt", "zarr"])) as reference:
        _assert_same_origin(origin, reference)



def test_cli_ingest_rejects_unknown_format(reanalysis, tmp_path, capsys) -> None:
    from tierscope.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["ingest", str(reanalysis), str(tmp_path / "o"), "--block", "1,1,16,16", "--format", "nc"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "argument --format: invalid choice: 'nc' (choose from 'zarr', 'tiledb', 'hdf5')" in error
    assert not (tmp_path / "o").exists()



def test_ingest_under_a_distributed_client(cluster, reanalysis, stores, tmp_path) -> None:
    """A notebook with a Client active: the TileDB/HDF5 writes stay in this process (an open array or
    file handle cannot be sent to a worker)."""
    from distributed import Client

    with Client(cluster):
        for fmt in ("tiledb", "hdf5"):
            out = ingest(reanalysis, tmp_path / f"hgt{SUFFIX[fmt]}", (1, 1, 16, 16), fmt=fmt)
            with closing(open_origin(out)) as origin, closing(open_origin(stores["hgt", "zarr"])) as ref:
                _assert_same_origin(origin, ref)


def test_a_store_missing_a_listed_variable_is_a_store_error(tmp_path) -> None:
    src = tmp_path / "two.zarr"
    xr.Dataset({"a": (("x",), np.arange(4.0)), "b": (("x",), np.arange(4.0))}).to_zarr(
        src, zarr_format=3, consolidated=False)
    h5 = ingest(src, tmp_path / "two.h5", {"x": 2}, fmt="hdf5")
    with h5py.File(h5, "a") as file:
        del file["b"]
    with pytest.raises(StoreError, match="as an HDF5 dataset"):
        HDF5Origin(h5)
    tdb = ingest(src, tmp_path / "two.tdb", {"x": 2}, fmt="tiledb")
    shutil.rmtree(tdb / "b")
    with pytest.raises(StoreError, match="as a TileDB dataset"):
        TileDBOrigin(tdb)


def test_an_empty_dimension_reads_the_same_from_hdf5_and_zarr(tmp_path) -> None:
    src = tmp_path / "empty.zarr"
    xr.Dataset({"v": (("x", "y"), np.empty((2, 0)))}).to_zarr(src, zarr_format=3, consolidated=False)
    zarr_info = ZarrOrigin(ingest(src, tmp_path / "e.zarr", {"x": 1})).info().variable("v")
    h5_info = HDF5Origin(ingest(src, tmp_path / "e.h5", {"x": 1}, fmt="hdf5")).info().variable("v")
    assert h5_info.shape == zarr_info.shape == (2, 0)
    assert h5_info.grid.nblocks[1] == zarr_info.grid.nblocks[1] == 0  # no block to read, no error
