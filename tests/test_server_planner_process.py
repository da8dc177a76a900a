"""Prefetch planning in a child process (``BlockService(planner="process")``): the same plans as the
planning thread, the same coalescing and caps, epochs and distance views; the child ends with the service
and with the server's process, and a dead child stops prefetch but not requests. Real servers on
loopback, real child processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from tierscope.prefetch import Position
from tierscope.server import BlockService, ServerThread
from tierscope.server.planner import Delivery, View
from tierscope.server.planner_process import ProcessPlanner
from tierscope.store.origin import ZarrOrigin

from conftest import wait_for
from test_server_planner import ROOM, VARIABLE, view  # the planning thread's tests' views


def moves(server: ServerThread, service: BlockService, session: str = "s") -> None:
    """A session moving on every request, each view planned before the next request."""
    for t in range(4):
        headers = {"X-Tierscope-Session": session, "X-Tierscope-Position": f"{t}.0.0.0;{t}.1.1.1"}
        request = urllib.request.Request(f"{server.url}/datasets/turb/blocks/u/{t}.0.0.0", headers=headers)
        with urllib.request.urlopen(request) as response:
            assert response.status == 200
        service.stats()  # waits until the planner has handed the view back


def deliveries(planner: ProcessPlanner, views: list[View], until: int) -> list[Delivery]:
    """Start ``planner`` on a loop, observe ``views`` (waking it on the last), collect what it delivers
    until ``until`` views are finished, stop it."""
    delivered: list[Delivery] = []

    async def run() -> None:
        planner._deliver = delivered.append
        planner.start()
        try:
            for i, each in enumerate(views):
                planner.observe(each, wake=i == len(views) - 1)
            for _ in range(1000):
                if delivered and delivered[-1].done == until:
                    return
                await asyncio.sleep(0.01)
        finally:
            planner.stop()

    asyncio.run(run())
    assert delivered and delivered[-1].done == until
    return delivered


def test_the_planner_process_makes_the_planning_threads_plans(sample_store):
    results = {}
    for planner in ("thread", "process"):
        service = BlockService([ZarrOrigin(sample_store)], l3="4MiB", l4="4MiB", prefetch="neighbourhood",
                               planner=planner)
        with ServerThread(service) as server:
            moves(server, service)
            stats = service.stats()
            results[planner] = (stats["sessions"], stats["prefetch"]["planned"])
            if planner == "process":
                assert isinstance(service._planner, ProcessPlanner)
                child = service._planner.process
                assert child.poll() is None and service.config()["planner"] == "process"
    assert results["process"] == results["thread"] and results["process"][1] > 0
    assert child.wait(timeout=10) == 0  # it ended with the service, cleanly


def test_the_planner_process_coalesces_a_positions_views_and_caps_those_waiting():
    planner = ProcessPlanner(lambda delivery: None)
    delivered = deliveries(planner, [view("a", 0), view("b", 0), view("a", 2)], until=2)
    assert planner.issued == 2
    plans = [d.planned for d in delivered if d.planned is not None]
    assert [p.key[0] for p in plans] == ["a", "b"]  # a once, at its newest view
    fresh = Position(VARIABLE.grid)
    fresh.observe_box(view("a", 2).box)
    expected = fresh.plan("neighbourhood", ROOM.radius(VARIABLE, fresh), limit=64)
    assert [item.index for item in plans[0].items] == expected
    assert delivered[-1].positions == 2

    capped = ProcessPlanner(lambda delivery: None, max_pending=2)
    delivered = deliveries(capped, [view(session, 1) for session in "abc"], until=3)  # a dropped
    assert [d.planned.key[0] for d in delivered if d.planned is not None] == ["b", "c"]


def test_the_planner_process_starts_over_on_a_new_configuration_and_hands_back_distance_views(
        sample_store):
    service = BlockService([ZarrOrigin(sample_store)], l3="4MiB", l4="4MiB", prefetch="auto",
                           planner="process")
    with ServerThread(service) as server:
        moves(server, service, "a")
        assert service.stats()["sessions"] == 1
        asyncio.run_coroutine_threadsafe(service.configure(policy="distance"), server._loop).result()
        assert service.stats()["sessions"] == 0
        moves(server, service, "b")
        assert service.stats()["sessions"] == 1  # a's position went with the old configuration
        views = service._views[("turb", "u")]
        assert [(box.lo, box.hi) for box in views.boxes] == [((3, 0, 0, 0), (3, 1, 1, 1))]


def test_a_dead_planner_process_stops_prefetch_planning_but_not_requests(sample_store, caplog):
    service = BlockService([ZarrOrigin(sample_store)], l3="4MiB", l4="4MiB", prefetch="auto",
                           planner="process")
    with caplog.at_level(logging.ERROR, "tierscope.server.planner_process"), ServerThread(service) as server:
        moves(server, service, "a")
        planned = service.stats()["prefetch"]["planned"]
        assert planned > 0
        service._planner.process.kill()
        assert wait_for(lambda: not service._planner.alive)
        moves(server, service, "b")  # served, and stats() does not wait for plans that will not come
        stats = service.stats()
        assert stats["prefetch"]["planned"] == planned and stats["requests"]["user"] == 8
    assert "ended unexpectedly" in caplog.text and "requests are still served" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a process's state: /proc (Linux)")
def test_the_planner_process_ends_when_the_server_process_dies(sample_store):
    code = ("import time; from tierscope.server import BlockService, ServerThread; "
            "from tierscope.store.origin import ZarrOrigin; "
            f"service = BlockService([ZarrOrigin({str(sample_store)!r})], prefetch='auto', "
            "planner='process'); "
            "server = ServerThread(service).start(); "
            "print(service._planner.process.pid, flush=True); time.sleep(120)")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(server.stdout.readline())
        assert os.path.exists(f"/proc/{child}")
    finally:
        server.send_signal(signal.SIGKILL)  # no clean-up in the server: the child sees its stdin close
        server.wait(timeout=30)

    def ended() -> bool:
        try:
            with open(f"/proc/{child}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not reaped yet
        except FileNotFoundError:
            return True

    assert wait_for(ended, timeout=20)


def test_an_unknown_planner_is_refused(sample_store):
    with pytest.raises(ValueError, match="planner must be one of thread, process, got 'fork'"):
        BlockService([ZarrOrigin(sample_store)], planner="fork")


def test_stats_report_where_plans_are_made(sample_store):
    service = BlockService([ZarrOrigin(sample_store)])
    assert json.loads(json.dumps(service.config()))["planner"] == "thread"
