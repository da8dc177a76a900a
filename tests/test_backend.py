"""engine="tierscope" against xr.open_zarr on the same store: exact equality (tol=0)."""

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tierscope
import tierscope.client
from tests.conftest import SHAPE
from tierscope.errors import DatasetNotFoundError, ServerUnavailableError

DIMS = ("time", "z", "y", "x")


def open_ref(store):
    return xr.open_zarr(store, zarr_format=3, consolidated=False)


@st.composite
def selections(draw):
    """A random isel: per dim an int, a slice (any step, negative bounds) or a list of indices."""
    sel = {}
    for dim, size in zip(DIMS, SHAPE, strict=True):
        kind = draw(st.sampled_from(["skip", "int", "slice", "list"]))
        if kind == "int":
            sel[dim] = draw(st.integers(-size, size - 1))
        elif kind == "slice":
            sel[dim] = slice(draw(st.none() | st.integers(-size, size)),
                             draw(st.none() | st.integers(-size, size)),
                             draw(st.none() | st.integers(1, 5)))
        elif kind == "list":
            sel[dim] = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=4))
    return sel


@pytest.fixture(scope="module")
def local_tiers():
    tierscope.connect(None, l1="32MiB", l2="64MiB")


@pytest.mark.parametrize("via", ["http", "embedded"])
def test_whole_dataset_identical_to_open_zarr(via, dataset_url, sample_store, local_tiers):
    ours = xr.open_dataset(dataset_url if via == "http" else sample_store, engine="tierscope")
    ref = open_ref(sample_store)
    assert ours.u.encoding["preferred_chunks"] == {"time": 1, "z": 8, "y": 16, "x": 16}
    xr.testing.assert_identical(ours.load(), ref.load())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sel=selections())
def test_random_isel_without_cluster(sel, dataset_url, sample_store, local_tiers):
    ours = xr.open_dataset(dataset_url, engine="tierscope")
    xr.testing.assert_identical(ours.isel(sel).load(), open_ref(sample_store).isel(sel).load())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_sel_by_label_without_cluster(data, dataset_url, sample_store, local_tiers):
    ref = open_ref(sample_store)
    sel = {
        dim: data.draw(st.sampled_from(ref[dim].values.tolist()))
        for dim in data.draw(st.sets(st.sampled_from(DIMS), min_size=1))
    }
    ours = xr.open_dataset(dataset_url, engine="tierscope")
    xr.testing.assert_identical(ours.sel(sel).load(), ref.sel(sel).load())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sel=selections())
def test_random_isel_on_local_cluster(sel, client, dataset_url, sample_store):
    ours = xr.open_dataset(dataset_url, engine="tierscope")
    xr.testing.assert_identical(ours.isel(sel).load(), open_ref(sample_store).isel(sel).load())


def test_chunks_follow_stored_blocks(client, dataset_url, sample_store):
    ours = xr.open_dataset(dataset_url, engine="tierscope", chunks={})
    assert ours.u.chunks == ((1,) * 4, (8, 8), (16, 16), (16, 16))
    ref = open_ref(sample_store)
    xr.testing.assert_identical(ours.u.mean("time").compute(), ref.u.mean("time").compute())


def test_bad_arguments_are_named(dataset_url, server):
    with pytest.raises(ValueError, match="tol must be finite and >= 0"):
        xr.open_dataset(dataset_url, engine="tierscope", tol=-1)
    with pytest.raises(DatasetNotFoundError, match="no dataset named 'nope'"):
        xr.open_dataset(f"{server.url}/datasets/nope", engine="tierscope")
    with pytest.raises(ValueError, match="malformed dataset URL"):
        xr.open_dataset(f"{server.url}/turb", engine="tierscope")


def test_server_down_names_the_url():
    with pytest.raises(ServerUnavailableError, match="127.0.0.1:9"):
        xr.open_dataset("http://127.0.0.1:9/datasets/turb", engine="tierscope")


def test_engine_is_registered_and_guesses_urls(dataset_url):
    from tierscope.backend import TierscopeBackendEntrypoint

    assert "tierscope" in xr.backends.list_engines()
    assert TierscopeBackendEntrypoint().guess_can_open(dataset_url)
    assert not TierscopeBackendEntrypoint().guess_can_open("file.nc")


def test_real_reanalysis_from_eofs_wheel(tmp_path, local_tiers):
    """A real dataset that ships inside a PyPI wheel, ingested, served, and read back exactly."""
    import pathlib

    import eofs

    from tierscope.server import BlockService, ServerThread
    from tierscope.store import ingest
    from tierscope.store.origin import ZarrOrigin

    src = pathlib.Path(eofs.__file__).parent / "examples" / "example_data" / "hgt_djf.nc"
    store = ingest(src, tmp_path / "hgt.zarr", (1, 1, 16, 16))
    with ServerThread(BlockService([ZarrOrigin(store)])) as server:
        ours = xr.open_dataset(f"{server.url}/datasets/hgt", engine="tierscope").load()
    xr.testing.assert_identical(ours, open_ref(store).load())
    xr.testing.assert_identical(ours, xr.open_dataset(src).load())
    assert np.isfinite(ours.z.values).all()


@pytest.mark.parametrize("tol", [1e-3, 5e-2])
def test_views_stay_within_tol_and_travel_smaller(tol, dataset_url, sample_store, local_tiers):
    """A view opened with tol > 0 is error-bounded (lorenzo codec on the server), not exact."""
    from tierscope import codec

    ours = xr.open_dataset(dataset_url, engine="tierscope", tol=tol).load()
    ref = open_ref(sample_store).load()
    for name in ("u", "v", "p"):
        error = np.abs(ours[name].values.astype(np.float64) - ref[name].values)
        assert error.max() <= tol  # (exact where a tighter block was cached: that is within tol too)
    transport = tierscope.client.Source.parse(dataset_url).transport()
    exact = transport.fetch("turb", "u", (0, 0, 0, 0), 0.0).frame
    bounded = transport.fetch("turb", "u", (0, 0, 0, 0), tol).frame
    assert codec.read_header(bounded).codec == "lorenzo" and codec.read_header(bounded).tol == tol
    assert len(bounded) < len(exact)
