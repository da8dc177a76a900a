import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierscope.errors import BlockIndexError
from tierscope.grid import BlockGrid, distance


def test_slices_and_partial_last_block():
    grid = BlockGrid((5, 10), (2, 4))
    assert grid.nblocks == (3, 3)
    assert grid.chunks == ((2, 2, 1), (4, 4, 2))
    assert grid.slices((2, 2)) == (slice(4, 5), slice(8, 10))


@given(
    shape=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    data=st.data(),
)
def test_blocks_tile_the_array_exactly(shape, data):
    block = [data.draw(st.integers(1, s + 2)) for s in shape]
    grid = BlockGrid(tuple(shape), tuple(block))
    covered = np.zeros(shape, dtype=int)
    for index in grid.indices():
        covered[grid.slices(index)] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize(
    ("index", "message"),
    [((0, 3), "out of range on axis 1"), ((0,), "has 1 axes, expected 2"), ((-1, 0), "axis 0")],
)
def test_bad_index_names_the_problem(index, message):
    with pytest.raises(BlockIndexError, match=message):
        BlockGrid((4, 4), (2, 2)).check(index)


def test_distance_counts_time_apart():
    assert distance((0, 0, 0, 0), (2, 1, 3, 0)) == 2 + 3
    assert distance((5, 1, 1, 1), (5, 1, 1, 1)) == 0
    assert distance((0, 0), (3, 4), time_axis=None) == 4


@settings(max_examples=50)
@given(
    center=st.tuples(*[st.integers(0, 3)] * 4),
    radius=st.integers(0, 3),
)
def test_ball_is_exact_and_nearest_first(center, radius):
    grid = BlockGrid((4, 4, 4, 4), (1, 1, 1, 1))
    ball = list(grid.ball(center, radius))
    expected = {i for i in grid.indices() if distance(i, center) <= radius}
    assert set(ball) == expected and len(ball) == len(expected)
    hops = [distance(i, center) for i in ball]
    assert hops == sorted(hops) and ball[0] == center
