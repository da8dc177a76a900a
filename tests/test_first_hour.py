"""Issue #14, "the first hour": rewritten stores, closing, provenance of lossy views, URLs, codec default.

Real stores on disk and in fsspec's memory filesystem, the session's block server on loopback and the
shared LocalCluster; no mocks.
"""

from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr

import tierscope
from tierscope import codec
from tierscope.errors import StoreError
from tierscope.store import ingest, write_sample
from tierscope.store.sample import sample_field

BLOCK = (1, 8, 16, 16)


def open_ref(store) -> xr.Dataset:
    return xr.open_zarr(store, zarr_format=3, consolidated=False).load()


def write(path: Path, shape=(2, 16, 32, 32), seed: int = 1, overwrite: bool = False) -> Path:
    return write_sample(path, shape=shape, block=BLOCK, variables=("u", "p"), seed=seed, overwrite=overwrite)


@pytest.fixture
def local_tiers():
    tierscope.connect(None, l1="64MiB", l2="64MiB")


# --- 1. a rewritten store is never served from stale state; ds.close() releases the store's files


@pytest.mark.parametrize("new_shape", [(2, 16, 32, 32), (3, 16, 16, 32)], ids=["same-shape", "new-shape"])
def test_rewritten_zarr_store_reopens_with_new_contents(tmp_path, local_tiers, new_shape):
    store = write(tmp_path / "turb.zarr", seed=1)
    old = xr.open_dataset(store, engine="tierscope").load()  # fills the process-local L1/L2
    xr.testing.assert_identical(old, open_ref(store))
    write(store, shape=new_shape, seed=2, overwrite=True)
    new = xr.open_dataset(store, engine="tierscope")
    assert new.u.shape == new_shape
    xr.testing.assert_identical(new.load(), open_ref(store))


def test_closed_hdf5_dataset_lets_the_file_be_rewritten_in_place(tmp_path, local_tiers):
    h5 = ingest(write(tmp_path / "turb.zarr"), tmp_path / "turb.h5", block=BLOCK, fmt="hdf5")
    first, second = (xr.open_dataset(h5, engine="tierscope") for _ in range(2))
    before = first.u.values
    first.close()
    with pytest.raises(OSError, match="already open"):  # the other open dataset still holds the file
        h5py.File(h5, "r+")
    second.close()
    with h5py.File(h5, "r+") as file:
        file["u"][...] = file["u"][...] + 1
    np.testing.assert_array_equal(xr.open_dataset(h5, engine="tierscope").u.values, before + 1)


@pytest.mark.parametrize("fmt", ["hdf5", "tiledb"])
def test_reingested_store_reopens_with_new_values(tmp_path, local_tiers, fmt):
    zarr_store = write(tmp_path / "turb.zarr", seed=1)
    store = ingest(zarr_store, tmp_path / f"turb.{fmt}", block=BLOCK, fmt=fmt)
    xr.open_dataset(store, engine="tierscope").load()
    write(zarr_store, seed=2, overwrite=True)
    ingest(zarr_store, store, block=BLOCK, fmt=fmt, overwrite=True)
    xr.testing.assert_identical(xr.open_dataset(store, engine="tierscope").load(), open_ref(zarr_store))


def test_closing_releases_the_workers_handles_too(tmp_path, client):
    h5 = ingest(write(tmp_path / "turb.zarr"), tmp_path / "turb.h5", block=BLOCK, fmt="hdf5")
    ds = xr.open_dataset(h5, engine="tierscope")
    before = ds.u.values  # block loads on the workers: each opens the file
    ds.close()
    with h5py.File(h5, "r+") as file:  # HDF5 locks the file while any process has it open
        file["u"][...] = file["u"][...] + 1
    np.testing.assert_array_equal(xr.open_dataset(h5, engine="tierscope").u.values, before + 1)


# --- 2. a lossy view carries its error bound and codec


def test_lossy_view_records_tol_and_codec_through_to_netcdf(tmp_path, sample_store, local_tiers):
    lossy = xr.open_dataset(sample_store, engine="tierscope", tol=1e-3)
    for name in ("u", "v", "p"):
        assert lossy[name].attrs["tierscope_tol"] == 1e-3
        assert lossy[name].attrs["tierscope_codec"] == "lorenzo"
        assert lossy[name].encoding["tierscope_tol"] == 1e-3
    assert "tierscope_tol" not in lossy.time.attrs  # coordinates are served exactly
    lossy.to_netcdf(tmp_path / "view.nc")
    written = xr.open_dataset(tmp_path / "view.nc", engine="netcdf4").load()
    assert written.u.attrs["tierscope_tol"] == 1e-3 and written.u.attrs["tierscope_codec"] == "lorenzo"
    assert float(abs(written.u - open_ref(sample_store).u).max()) <= 1e-3


def test_lossless_view_keeps_the_stored_attrs(sample_store, local_tiers):
    exact = xr.open_dataset(sample_store, engine="tierscope")
    assert exact.u.encoding["tierscope_tol"] == 0.0
    assert exact.u.attrs == open_ref(sample_store).u.attrs


def test_lossy_view_over_http_names_the_servers_codec(dataset_url, local_tiers):
    ds = xr.open_dataset(dataset_url, engine="tierscope", tol=0.01)
    assert (ds.u.attrs["tierscope_tol"], ds.u.attrs["tierscope_codec"]) == (0.01, "lorenzo")


# --- 3. URLs: file://, fsspec URLs with storage_options


def test_file_url_opens_the_local_store(sample_store, local_tiers):
    ds = xr.open_dataset(Path(sample_store).as_uri(), engine="tierscope")
    xr.testing.assert_identical(ds.load(), open_ref(sample_store))


def test_memory_url_opens_and_follows_a_rewrite(sample_store, local_tiers):
    url = "memory://first-hour/turb.zarr"
    ref = open_ref(sample_store)
    ref.chunk(dict(zip(ref.u.dims, BLOCK))).to_zarr(url, zarr_format=3, consolidated=False, mode="w")
    ds = xr.open_dataset(url, engine="tierscope")
    assert ds.u.encoding["preferred_chunks"] == dict(zip(ds.u.dims, BLOCK))
    xr.testing.assert_identical(ds.load(), ref)
    changed = (ref * 2).assign_attrs(ref.attrs)
    changed.chunk(dict(zip(ref.u.dims, BLOCK))).to_zarr(url, zarr_format=3, consolidated=False, mode="w")
    xr.testing.assert_identical(xr.open_dataset(url, engine="tierscope").load(), changed)


def test_storage_options_reach_fsspec(tmp_path, sample_store, local_tiers):
    ref = open_ref(sample_store)
    ref.chunk(dict(zip(ref.u.dims, BLOCK))).to_zarr("memory://first-hour/cached.zarr", zarr_format=3,
                                                    consolidated=False, mode="w")
    cache = tmp_path / "cache"
    ds = xr.open_dataset("simplecache::memory://first-hour/cached.zarr", engine="tierscope",
                         storage_options={"simplecache": {"cache_storage": str(cache)}})
    xr.testing.assert_identical(ds.load(), ref)
    assert any(cache.iterdir())  # fsspec's simplecache kept its copies where the options said


def test_storage_options_on_a_path_or_server_url_are_refused(sample_store, dataset_url):
    for location in (sample_store, dataset_url):
        with pytest.raises(ValueError, match="storage_options apply to fsspec store URLs"):
            xr.open_dataset(location, engine="tierscope", storage_options={"anon": True})


def test_missing_fsspec_store_is_a_store_error():
    with pytest.raises(StoreError, match="memory://first-hour/missing.zarr"):
        xr.open_dataset("memory://first-hour/missing.zarr", engine="tierscope")


# --- 4. codec.encode defaults to the error-bounded codec


def test_encode_defaults_to_the_error_bounded_codec():
    field = sample_field((64, 64, 64), "u", seed=0).astype(np.float32)
    frame = codec.encode(field, 1e-2)
    assert codec.read_header(frame).codec == "lorenzo"
    assert float(np.abs(codec.decode(frame) - field).max()) <= 1e-2
    assert field.nbytes / len(frame) > 4 * field.nbytes / len(codec.encode(field, 1e-2, codec="zstd"))
    np.testing.assert_array_equal(codec.decode(codec.encode(field)), field)  # tol=0: lossless


def test_a_tiledb_group_without_tiledb_names_the_missing_extra(tmp_path, monkeypatch):
    import sys

    from tierscope.errors import StoreError
    from tierscope.store.origin import open_origin

    group = tmp_path / "turb.tdb"
    (group / "__group").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "tierscope.store.tiledb", None)  # as without the tiledb package
    with pytest.raises(StoreError, match=r"TileDB group but the tiledb package is missing: pip install 'tierscope\[tiledb\]'"):
        open_origin(group)


@pytest.mark.parametrize("fmt", ["tiledb", "hdf5"])
def test_ingest_to_a_format_without_its_package_names_the_extra(tmp_path, monkeypatch, fmt):
    import sys

    from tierscope.store.ingest import ingest

    monkeypatch.setitem(sys.modules, f"tierscope.store.{fmt}", None)  # as without the package
    with pytest.raises(ValueError, match=rf"--format {fmt} needs the {fmt} extra .*pip install 'tierscope\[{fmt}\]'"):
        ingest(tmp_path / "missing.nc", tmp_path / "out", block=(1, 1), fmt=fmt)
