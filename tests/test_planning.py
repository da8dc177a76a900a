"""The planning thread both prefetch hosts share (``tierscope.planning``): what the loop hands over, in what
order the thread takes it, and what comes back. A real thread; the items are plain values."""

from __future__ import annotations

import threading
import time

from tierscope.planning import REST, PlanningThread

from conftest import wait_for


def test_a_call_drops_the_waiting_items_it_names_and_runs_before_the_rest():
    done: list[tuple[object, int]] = []
    order: list[str] = []

    def plan(item: str) -> str:
        order.append(item)
        return item

    thread: PlanningThread[tuple[str, str], str, str] = PlanningThread(
        plan, lambda result, finished: done.append((result, finished)), "test-planner")
    for key in (("a", "u"), ("b", "u"), ("a", "v")):
        thread.submit(key, f"{key[0]}-{key[1]}")
    thread.submit(("b", "u"), "b-u2")  # a newer view of a waiting position replaces it, in its place
    thread.call(lambda: order.append("forget a") or "forgot a", lambda key: key[0] == "a")
    assert thread.issued == 3
    thread.start()
    try:
        assert wait_for(lambda: done and done[-1][1] == 3)  # a's two dropped, b planned: all finished
    finally:
        thread.stop()
    assert order == ["forget a", "b-u2"]
    assert [r for r, _ in done] == ["forgot a", "b-u2"]


def test_plans_run_on_the_planning_thread_and_a_failing_one_does_not_stop_it():
    names: list[str] = []

    def plan(item: int) -> int:
        names.append(threading.current_thread().name)
        return 1 // item  # 0 raises

    done: list[tuple[object, int]] = []
    thread: PlanningThread[int, int, int] = PlanningThread(plan, lambda r, n: done.append((r, n)),
                                                           "test-planner")
    thread.start()
    try:
        thread.submit(0, 0)
        thread.submit(1, 1)
        assert wait_for(lambda: done and done[-1][1] == 2)
    finally:
        thread.stop()
    assert set(names) == {"test-planner"} and done[-1] == (1, 2)


def test_the_thread_rests_as_long_as_each_plan_took_it():
    """So planning holds the GIL and a CPU at most half the time however fast views come: the next item
    starts no sooner than REST times the last one's CPU time after it ended, though it was waiting."""
    spans: list[tuple[float, float, float]] = []  # (start, end, CPU) of each plan

    def plan(item: int) -> int:
        start, cpu = time.perf_counter(), time.thread_time()
        while time.thread_time() - cpu < 0.02:
            pass
        spans.append((start, time.perf_counter(), time.thread_time() - cpu))
        return item

    done: list[tuple[object, int]] = []
    thread: PlanningThread[int, int, int] = PlanningThread(plan, lambda r, n: done.append((r, n)),
                                                           "test-planner")
    for key in range(3):
        thread.submit(key, key)
    thread.start()
    try:
        assert wait_for(lambda: done and done[-1][1] == 3)
    finally:
        thread.stop()
    gaps = [(nxt[0] - last[1], REST * last[2]) for last, nxt in zip(spans, spans[1:])]
    assert len(gaps) == 2 and all(gap >= rest for gap, rest in gaps), gaps


def test_an_item_queued_without_waking_waits_for_the_next_wake():
    done: list[tuple[object, int]] = []
    thread: PlanningThread[int, int, int] = PlanningThread(lambda item: item, lambda r, n: done.append((r, n)),
                                                           "test-planner")
    thread.start()
    try:
        thread.submit(1, 1)
        assert wait_for(lambda: done and done[-1][1] == 1)
        thread.submit(2, 2, wake=False)  # a view repeating its position's last one
        time.sleep(0.2)
        assert done[-1][1] == 1
        thread.wake()
        assert wait_for(lambda: done[-1][1] == 2)
    finally:
        thread.stop()
