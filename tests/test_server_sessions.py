"""The server's session table: distances for its distance policy agree with tierscope.prefetch."""

from tierscope.grid import BlockGrid
from tierscope.server.sessions import Sessions

GRID = BlockGrid((10, 4, 4, 4), (1, 1, 1, 1))


def distance(sessions, index):
    """Hops from ``index`` to the nearest view on (d, u), as the server's tiers rank cached blocks."""
    views = sessions.views(("d", "u"))
    return float("inf") if views is None else views.hops_of(index)


def test_distance_counts_time_steps_like_position_distance():
    sessions = Sessions()
    pos, _ = sessions.position(("s", "d", "u", 0.0), GRID, time_axis=0)
    pos.observe([(0, 0, 0, 0)])
    for index, hops in [((0, 0, 0, 0), 0), ((5, 0, 0, 0), 5), ((5, 3, 0, 0), 8), ((0, 1, 2, 3), 3)]:
        assert distance(sessions, index) == hops == pos.distance(index)


def test_distance_is_to_the_nearest_session_and_inf_without_one():
    sessions = Sessions()
    assert distance(sessions, (0, 0, 0, 0)) == float("inf")
    a, _ = sessions.position(("a", "d", "u", 0.0), GRID)
    b, _ = sessions.position(("b", "d", "u", 0.0), GRID)
    a.observe([(0, 0, 0, 0)])
    b.observe([(9, 3, 3, 3)])
    sessions.moved("d", "u")
    assert distance(sessions, (8, 3, 3, 3)) == 1
    assert distance(sessions, (1, 0, 0, 0)) == 1
