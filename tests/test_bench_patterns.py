import json

import numpy as np
import pytest
import xarray as xr

from tierscope.bench.patterns import (
    PATTERNS,
    Sequence,
    View,
    access_density,
    generate,
    hops,
    max_distance,
    jumps,
    playback,
    random_jumps,
    recycle_ratio,
    scanning,
    wandering,
    zoom_pan,
)
from tierscope.grid import BlockGrid

# Partial last blocks on every spatial axis, so block arithmetic at the edges is exercised.
GRID = BlockGrid((7, 20, 24, 28), (1, 8, 8, 8))
BIG = BlockGrid((32, 64, 64, 64), (1, 16, 16, 16))


@pytest.fixture(scope="module")
def block_ids() -> xr.DataArray:
    """Each element holds the flat id of its block: a selection's unique values are the blocks it reads."""
    ids = np.empty(GRID.shape, dtype=np.int64)
    for flat, index in enumerate(GRID.indices()):
        ids[GRID.slices(index)] = flat
    return xr.DataArray(ids, dims=("time", "z", "y", "x"))


def flat_ids(blocks) -> set[int]:
    return {int(np.ravel_multi_index(b, GRID.nblocks)) for b in blocks}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_same_seed_same_views_other_seed_other_views(pattern):
    a, b, c = (generate(pattern, BIG, 40, seed) for seed in (7, 7, 8))
    assert a == b
    assert a.views != c.views
    assert len(a.views) == 40 and a.pattern == pattern and a.seed == 7


def test_patterns_do_not_share_a_random_stream():
    assert wandering(BIG, 20, 1).views != random_jumps(BIG, 20, 1, jump=0.0).views


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_views_are_real_selections_inside_the_grid_with_the_right_blocks(pattern, seed, block_ids):
    seq = generate(pattern, GRID, 30, seed)
    for view in seq.views:
        assert view.check(GRID) is view
        selected = block_ids.isel(view.isel())
        assert flat_ids(view.blocks(GRID)) == set(np.unique(selected.values).tolist())
        assert selected.sizes.get("time", 1) == 1  # one time step per view


def test_view_blocks_by_hand():
    view = View(3, 7, slice(5, 17), (0, 28))
    assert view.isel() == {"time": 3, "z": 7, "y": slice(5, 17), "x": slice(0, 28)}
    assert view.isel(("t", "depth", "lat", "lon"))["lat"] == slice(5, 17)
    assert view.blocks(GRID) == [(3, 0, y, x) for y in (0, 1, 2) for x in (0, 1, 2, 3)]


@pytest.mark.parametrize(
    ("view", "message"),
    [
        (View(7, 0, 0, 0), "time selection 7 is outside 0..6"),
        (View(0, (16, 21), 0, 0), r"z selection \(16, 21\) is outside 0..19"),
        (View(0, 0, -1, 0), "y selection -1 is outside"),
    ],
)
def test_view_outside_grid_names_the_dimension(view, message):
    with pytest.raises(ValueError, match=message):
        view.check(GRID)


def test_bad_view_selections_are_refused():
    with pytest.raises(ValueError, match=r"z: empty range \[5, 5\)"):
        View(0, (5, 5), 0, 0)
    with pytest.raises(ValueError, match="no step"):
        View(0, slice(0, 8, 2), 0, 0)
    with pytest.raises(ValueError, match=r"a view is \[t, z, y, x\]"):
        View.from_json([1, 2, 3])


def test_playback_steps_time_at_a_fixed_slice_and_wraps():
    seq = playback(GRID, 10, 0, z=11, t0=4)
    assert [v.t for v in seq.views] == [4, 5, 6, 0, 1, 2, 3, 4, 5, 6]
    assert {v.z for v in seq.views} == {11}
    assert seq.views[0].y == (0, 24) and seq.views[0].x == (0, 28)
    assert hops(seq.block_sets()) == [1, 1, 6, 1, 1, 1, 1, 1, 1]


def test_scanning_without_jumps_sweeps_and_turns_at_the_end():
    seq = scanning(GRID, 16, 3, axis="t", jump=0.0)
    ts = [v.t for v in seq.views]
    assert all(abs(b - a) == 1 for a, b in zip(ts, ts[1:]))
    assert {0, 6} <= set(ts) and len({v.z for v in seq.views}) == 1
    z_scan = scanning(GRID, 6, 3, axis="z", jump=0.0)
    zs = [v.z for v in z_scan.views]
    assert all(abs(b - a) == 8 for a, b in zip(zs, zs[1:])) and len({v.t for v in z_scan.views}) == 1


def test_scanning_jumps_about_as_often_as_asked():
    seq = scanning(BIG, 2001, 5, axis="t", jump=0.2)
    jumps = sum(a.z != b.z for a, b in zip(seq.views, seq.views[1:]))
    # A jump may land on the same z (1 in 64); 2000 steps at p=0.2 -> ~394 +- 18.
    assert 330 < jumps < 460


def test_wandering_moves_one_axis_one_step_and_keeps_direction_with_full_momentum():
    seq = wandering(BIG, 60, 4, momentum=1.0)
    steps = []
    for a, b in zip(seq.views, seq.views[1:]):
        delta = (b.t - a.t, b.z - a.z, b.y[0] - a.y[0], b.x[0] - a.x[0])
        assert sum(d != 0 for d in delta) == 1 and sorted(map(abs, delta))[-1] in (1, 16)
        steps.append(delta)
    axis = [i for i, d in enumerate(steps[0]) if d][0]
    assert all(d[axis] != 0 for d in steps)  # momentum 1: one axis, turning only at the edges
    assert seq.views[0].y[1] - seq.views[0].y[0] == 32  # default window: half the plane


def test_random_jumps_without_jumps_stays_local():
    assert max_distance(random_jumps(BIG, 80, 2, jump=0.0).block_sets()) <= 1
    assert max_distance(random_jumps(BIG, 80, 2, jump=1.0).block_sets()) > 3


def test_jumps_jump_then_step_time_on_the_whole_plane():
    seq = jumps(BIG, 12, seed=4, steps=3)
    assert seq.params["jumps"] == [0, 4, 8]
    for i, view in enumerate(seq.views):
        assert (view.y, view.x) == ((0, 64), (0, 64))  # the whole y/x plane
        if i % 4:
            prev = seq.views[i - 1]
            assert (view.t, view.z) == ((prev.t + 1) % 32, prev.z)
    starts = {(seq.views[i].t, seq.views[i].z) for i in (0, 4, 8)}
    assert len(starts) == 3  # each jump lands somewhere new (with this seed)


def test_zoom_pan_extents_stay_between_the_minimum_and_the_volume():
    seq = zoom_pan(BIG, 200, 6, zoom=0.5)
    sizes = {tuple(s[1] - s[0] for s in (v.z, v.y, v.x)) for v in seq.views}
    assert {(16, 16, 16), (64, 64, 64)} <= sizes  # shrank to the minimum and grew to the whole volume
    assert all(e in (16, 32, 64) for size in sizes for e in size)
    assert len({v.t for v in seq.views}) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: scanning(GRID, 5, 0, axis="y"), "'t' or 'z'"),
        (lambda: wandering(GRID, 5, 0, momentum=1.5), r"momentum is a probability in \[0, 1\]"),
        (lambda: playback(GRID, 0, 0), "at least one view"),
        (lambda: random_jumps(GRID, 5, 0, window=(25, 8)), "must fit the y/x plane"),
        (lambda: zoom_pan(GRID, 5, 0, min_extent=(0, 8, 8)), "min_extent"),
        (lambda: playback(BlockGrid((4, 4), (1, 2)), 3, 0), r"\(time, z, y, x\) grid"),
        (lambda: generate("spiral", GRID, 5, 0), "unknown access pattern 'spiral'"),
    ],
)
def test_bad_parameters_name_the_problem(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- metrics on hand-made block sets -------------------------------------------------------------------

HAND = [
    [(0, 0, 0, 0), (0, 0, 0, 1)],
    [(0, 0, 0, 1), (0, 0, 0, 2)],
    [(1, 0, 0, 0)],
    [(0, 0, 0, 0), (0, 0, 0, 1)],
]


def test_recycle_ratio_by_hand():
    # 7 accesses; revisits: (0,0,0,1) in view 2, both blocks of view 4 -> 3/7.
    assert recycle_ratio(HAND) == pytest.approx(3 / 7)
    assert recycle_ratio([[(0, 0, 0, 0)]] * 4) == pytest.approx(3 / 4)
    assert recycle_ratio([]) == 0.0


def test_hops_and_max_distance_by_hand():
    # view 2 from box x 0..1: (0,0,0,2) is 1 hop; view 3 from box x 1..2: dt 1 + dx 1 = 2;
    # view 4 from box (1,0,0,0): dt 1 + 0 for (0,0,0,0), dt 1 + dx 1 for (0,0,0,1) -> 2.
    assert hops(HAND) == [1, 2, 2]
    assert max_distance(HAND) == 2
    assert max_distance(HAND[:1]) == 0
    assert hops([[(0, 0, 0, 0)], [(0, 3, 1, 2)], [(5, 3, 1, 2)]]) == [3, 5]


def test_access_density_by_hand():
    grid = BlockGrid((2, 8, 8, 24), (1, 8, 8, 8))  # 2 x 1 x 1 x 3 = 6 blocks
    assert access_density(HAND, grid) == pytest.approx(4 / 6)


def test_sequence_metrics_match_the_functions():
    seq = Sequence("hand", "hand", 0, GRID.shape, GRID.block,
                   (View(0, 0, 0, (0, 9)), View(0, 0, 0, (8, 17)), View(1, 0, 0, 0)))
    assert seq.block_sets() == [HAND[0], HAND[1], HAND[2]]
    assert seq.metrics() == {"recycle_ratio": pytest.approx(1 / 5), "max_distance": 2,
                             "access_density": pytest.approx(4 / (7 * 3 * 3 * 4))}


# ---- files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_save_and_load_round_trip(pattern, tmp_path):
    seq = generate(pattern, GRID, 25, 11, name=f"my-{pattern}")
    path = seq.save(tmp_path / "seq.json")
    loaded = Sequence.load(path)
    assert loaded == seq and loaded.name == f"my-{pattern}"
    assert [v.isel() for v in loaded.views] == [v.isel() for v in seq.views]
    assert loaded.metrics() == seq.metrics()
    data = json.loads(path.read_text())
    assert data["format"] == "tierscope.sequence" and data["version"] == 1
    assert data["shape"] == [7, 20, 24, 28] and data["block"] == [1, 8, 8, 8]
    assert len(data["views"]) == 25 and path.read_text().count("\n") == 25 + 2


def test_loading_a_bad_file_names_the_problem(tmp_path):
    seq = playback(GRID, 3, 0)
    data = seq.to_dict()
    path = tmp_path / "bad.json"
    path.write_text("{oops")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        Sequence.load(path)
    path.write_text(json.dumps({**data, "format": "other"}))
    with pytest.raises(ValueError, match="not a tierscope sequence"):
        Sequence.load(path)
    path.write_text(json.dumps({**data, "views": [[0, 0, 0, 0], [9, 0, 0, 0]]}))
    with pytest.raises(ValueError, match="view 1: .*time selection 9 is outside 0..6"):
        Sequence.load(path)
    del data["seed"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing seed"):
        Sequence.load(path)
