"""The notebook explorer run headless against a real block server and a real LocalCluster: the first
picture is drawn coarse first, a slider move redraws it, and the status line names the level and hits."""

from __future__ import annotations

import pytest
import xarray as xr

import tierscope
from tierscope.refine import stats as progressive_stats

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def ds(levels_url):
    with xr.open_dataset(levels_url, engine="tierscope") as opened:
        yield opened


def test_explorer_draws_coarse_first_and_redraws_on_a_move(client, ds):
    explorer = tierscope.explore(ds["u"])
    assert list(explorer.sliders) == ["time", "z"]
    assert (explorer.sliders["time"].max, explorer.sliders["z"].max) == (2, 15)
    assert explorer.wait(60)
    first = bytes(explorer.image.value)
    assert first.startswith(PNG)
    assert [p.level for p in explorer.parts] == [2, 0]
    assert "showing level 0 (full resolution)" in explorer.status.value
    assert explorer.parts[-1].hits["fetches"] == 1 + 16  # a cold plane: level 2's block and level 0's

    explorer.sliders["time"].value = 2
    assert explorer.wait(60)
    assert bytes(explorer.image.value).startswith(PNG) and bytes(explorer.image.value) != first
    assert [p.level for p in explorer.parts] == [2, 0]
    latencies = [p.latency_s for p in explorer.parts]
    assert latencies == sorted(latencies)
    status = explorer.status.value
    assert "time=2 z=0" in status and "showing level 0" in status and "level 2 " in status
    assert "tier hits: L1 +" in status and "server fetches +17" in status

    explorer.sliders["time"].value = 0  # back to a plane the workers hold: L1 hits, nothing fetched
    assert explorer.wait(60)
    assert bytes(explorer.image.value) == first
    assert explorer.parts[-1].hits["l1_hits"] == 17 and explorer.parts[-1].hits["fetches"] == 0
    assert "L1 +17, L2 +0, server fetches +0" in explorer.status.value


def test_moves_in_a_row_end_with_the_last_one(client, ds):
    before = progressive_stats()["cancelled_views"]
    explorer = tierscope.explore(ds["p"])
    for z in range(1, 6):
        explorer.sliders["z"].value = z
    assert explorer.wait(60)
    assert progressive_stats()["cancelled_views"] - before == 5  # z=0..4: each stopped by the next move
    assert "z=5" in explorer.status.value and "showing level 0" in explorer.status.value
    assert [p.level for p in explorer.parts] == [2, 0]


def test_dimensions_are_chosen_or_refused_by_name(ds):
    explorer = tierscope.explore(ds["v"], time_dim="z", z_dim="time")
    assert explorer.wait(60)
    assert list(explorer.sliders) == ["time", "z"] and explorer.sliders["z"].max == 15
    single = tierscope.explore(ds["v"].isel(time=0))
    assert list(single.sliders) == ["z"] and single.wait(60)
    with pytest.raises(ValueError, match="z_dim='y' is not one of 'v'"):
        tierscope.explore(ds["v"], z_dim="y")
    with pytest.raises(ValueError, match="at least two dimensions"):
        tierscope.explore(ds["v"].isel(time=0, z=0, y=0))
    with pytest.raises(ValueError, match="holds loaded values"):
        tierscope.explore(ds["v"].isel(time=0).load())
