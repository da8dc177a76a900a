"""Position tracking, predictors and the radius formula of tierscope.prefetch."""

from __future__ import annotations

import itertools
import random

import pytest

from tierscope.grid import BlockGrid
from tierscope.prefetch import MODES, Box, Position, radius_for

GRID = BlockGrid((20, 8, 8, 8), (1, 1, 1, 1))  # 20 x 8^3 blocks


def slab(t: int, z: int) -> list[tuple[int, ...]]:
    """A z-slice of one time step covering 2 x 2 blocks in y, x."""
    return [(t, z, y, x) for y in (2, 3) for x in (2, 3)]


def test_box_distance_counts_time_apart():
    box = Box.of(slab(5, 4))
    assert box.extents == (1, 1, 2, 2)
    assert box.distance((5, 4, 3, 3)) == 0
    assert box.distance((6, 4, 3, 3)) == 1
    assert box.distance((7, 6, 0, 3)) == 2 + 2
    assert box.distance((7, 6, 0, 3), time_axis=None) == 2


def test_observe_reports_only_new_views():
    pos = Position(GRID)
    assert pos.observe(slab(0, 0))
    assert not pos.observe(reversed(slab(0, 0)))
    assert pos.observe(slab(1, 0))
    assert pos.velocity == (1, 0, 0, 0)
    assert pos.views == 2


def test_plan_excludes_view_stays_within_radius_nearest_first():
    pos = Position(GRID)
    pos.observe(slab(5, 4))
    plan = pos.plan("neighbourhood", radius=2)
    assert not set(plan) & set(slab(5, 4))
    dists = [pos.distance(i) for i in plan]
    assert dists == sorted(dists) and set(dists) == {1, 2}
    assert len(plan) == len(set(plan))
    # Every block within 2 hops of the view is in the plan.
    within = {i for i in GRID.indices() if 0 < pos.distance(i) <= 2}
    assert set(plan) == within


def test_playback_puts_next_steps_first():
    pos = Position(GRID)
    pos.observe(slab(5, 4))
    plan = pos.plan("playback", radius=3, limit=12)
    assert plan[:4] == slab(6, 4) and plan[4:8] == slab(7, 4) and plan[8:12] == slab(8, 4)


def test_momentum_repeats_the_last_step():
    pos = Position(GRID)
    pos.observe(slab(5, 2))
    pos.observe(slab(5, 3))
    plan = pos.plan("momentum", radius=2, limit=8)
    assert plan == slab(5, 4) + slab(5, 5)


def test_auto_follows_the_predictor_that_was_right():
    pos = Position(GRID)
    for t in range(4):
        pos.observe(slab(t, 4))
    assert pos.scores()["playback"] == 1.0
    assert pos.chosen() in ("playback", "momentum")  # both predict t+1 here
    assert pos.plan("auto", radius=1, limit=4) == slab(4, 4)
    # Now wander along z: momentum learns it, playback does not.
    for z in range(5, 8):
        pos.observe(slab(3, z))
    assert pos.scores()["momentum"] > pos.scores()["playback"]


def test_off_and_zero_radius_plan_nothing():
    pos = Position(GRID)
    assert pos.plan("auto", radius=3) == []  # no view yet
    pos.observe(slab(0, 0))
    assert pos.plan("off", radius=3) == []
    assert pos.plan("auto", radius=0) == []
    with pytest.raises(ValueError, match="prefetch mode must be one of"):
        pos.plan("sideways", radius=1)
    assert set(MODES) == {"off", "neighbourhood", "momentum", "playback", "auto"}


def test_plans_stay_inside_the_grid_at_edges():
    pos = Position(GRID)
    pos.observe([(19, 7, 7, 7)])
    for mode in MODES:
        for index in pos.plan(mode, radius=3):
            GRID.check(index)


def brute_ball(grid, box, r, time_axis):
    return sum(1 for i in grid.indices() if box.distance(i, time_axis) <= r)


@pytest.mark.parametrize("time_axis", [0, None])
def test_radius_formula_matches_counted_ball(time_axis):
    grid = BlockGrid((40, 12, 12, 12), (1, 1, 1, 1))
    center = Box.of([(20, 6, 6, 6)])
    for capacity_blocks in (1, 5, 9, 30, 200, 2000):
        r = radius_for(grid, capacity_blocks * 100, 100, time_axis=time_axis)
        assert brute_ball(grid, center, r, time_axis) <= capacity_blocks
        assert brute_ball(grid, center, r + 1, time_axis) > capacity_blocks


def test_radius_counts_time_and_view_size():
    grid = BlockGrid((100, 16, 16, 16), (1, 1, 1, 1))
    # r=1 around one block: 27 spatial + 2 time neighbours = 29 blocks.
    assert radius_for(grid, 29, 1) == 1
    assert radius_for(grid, 28, 1) == 0
    # A 1 x 1 x 4 x 4 view: r=1 holds 3*6*6 + 2*16 = 140 blocks.
    assert radius_for(grid, 140, 1, view=(1, 1, 4, 4)) == 1
    assert radius_for(grid, 139, 1, view=(1, 1, 4, 4)) == 0
    assert radius_for(grid, 0, 1) == 0


def test_wandering_scores_are_fractions():
    rng = random.Random(3)
    pos = Position(GRID)
    t, z = 5, 4
    for _ in range(30):
        t = min(max(t + rng.choice((-1, 0, 1)), 0), 19)
        z = min(max(z + rng.choice((-1, 0, 1)), 0), 7)
        pos.observe(slab(t, z))
    assert all(0.0 <= s <= 1.0 for s in pos.scores().values())
    assert pos.scores()["neighbourhood"] > 0


def test_c_order_ties_are_deterministic():
    a, b = Position(GRID), Position(GRID)
    for p in (a, b):
        p.observe(slab(3, 3))
    assert a.plan("neighbourhood", 2) == b.plan("neighbourhood", 2)
    assert list(itertools.islice(a.plan("auto", 2), 3)) == b.plan("auto", 2)[:3]


def counting(monkeypatch, name):
    """Count the rows (block indices) a module function of tierscope.prefetch returns."""
    from tierscope import prefetch

    rows = []
    real = getattr(prefetch, name)

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        rows.append(len(out) if hasattr(out, "__len__") else 1)
        return out

    monkeypatch.setattr(prefetch, name, counted)
    return rows


@pytest.mark.parametrize("mode", ["neighbourhood", "playback", "momentum", "auto"])
def test_plan_work_does_not_grow_with_the_dataset(monkeypatch, mode):
    """The same view and plan on a 10^3- and a 10^7-block grid enumerate the same blocks."""
    rings = counting(monkeypatch, "_ring")
    visited = []
    for nt in (2, 20_000):  # 2 x 8 x 8 x 8 blocks, then 2e4 x 8 x 8 x 8 = 1.3e7
        grid = BlockGrid((nt, 512, 512, 512), (1, 64, 64, 64))
        pos = Position(grid)
        pos.observe_box(Box((0, 2, 0, 0), (0, 2, 7, 7)))
        pos.observe_box(Box((1, 2, 0, 0), (1, 2, 7, 7)))
        rings.clear()
        plan = pos.plan(mode, radius=radius_for(grid, 64 << 30, 1 << 20, view=(1, 1, 8, 8)), limit=512)
        assert 0 < len(plan) <= 512
        visited.append(sum(rings))
    assert visited[1] <= max(visited[0], 1) * 2 and visited[1] <= 8 * 512


def test_radius_bisects_in_log_steps(monkeypatch):
    from tierscope import prefetch

    counts = counting(monkeypatch, "_ball_count")
    for nt in (10, 10_000, 10_000_000):
        prefetch._radius.cache_clear()
        counts.clear()
        grid = BlockGrid((nt, 8, 16, 16), (1, 1, 1, 1))
        r = radius_for(grid, 64 << 30, 1 << 20, view=(1, 1, 8, 8))
        assert len(counts) <= sum(grid.nblocks).bit_length() + 2
        fits = (64 << 30) / (1 << 20)
        assert brute_ball_count(grid, r) <= fits
        assert r == sum(grid.nblocks) or brute_ball_count(grid, r + 1) > fits  # all fits, or r is the largest


def brute_ball_count(grid, r):
    """Blocks within r hops of a 1 x 1 x 8 x 8 view in the middle of the grid (time clipped only by
    the grid; a view in the middle is what the formula assumes), counted step by step."""
    nt = grid.nblocks[0]
    total = 0
    for s in range(0, r + 1):
        steps = 1 if s == 0 else min(2, max(0, nt - 1 - 2 * (s - 1)))  # both sides while they exist
        q = r - s
        spatial = min(1 + 2 * q, grid.nblocks[1]) * min(8 + 2 * q, grid.nblocks[2]) * min(8 + 2 * q, grid.nblocks[3])
        total += steps * spatial
    return total


def test_a_cached_radius_is_reused_for_close_block_sizes():
    from tierscope import prefetch

    grid = BlockGrid((10_000, 8, 16, 16), (1, 1, 1, 1))
    prefetch._radius.cache_clear()
    radii = {radius_for(grid, 64 << 30, 140_000 + k, view=(1, 1, 8, 8)) for k in range(50)}
    assert prefetch._radius.cache_info().misses <= 2 and len(radii) == 1


def test_a_view_given_by_its_corners_is_the_same_position():
    pos = Position(GRID)
    assert pos.observe(slab(5, 4))
    assert not pos.observe([(5, 4, 3, 3), (5, 4, 2, 2)])  # the same box
    with pytest.raises(ValueError, match="lo <= hi"):
        pos.observe_box(Box((5, 4, 3, 3), (5, 4, 2, 2)))
