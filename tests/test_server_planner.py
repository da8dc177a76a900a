"""The server's loop kept for requests: positions move and plans are made on the planning thread, a
position's views are coalesced to the newest, the loop still answers a bad position header with a 400
naming it, takes the GIL back within 0.5 ms, and prefetch threads yield the CPUs to it. A real server on
loopback and a real ``Planner``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tierscope.metadata import VariableInfo
from tierscope.prefetch import Box, Position
from tierscope.server import BlockService, ServerThread
from tierscope.server.planner import THREAD_NAME, Planner, TierRoom, View
from tierscope.store.origin import ZarrOrigin

from conftest import BLOCK, SHAPE, wait_for

VARIABLE = VariableInfo("u", ("time", "z", "y", "x"), SHAPE, np.dtype("<f4"), BLOCK)
ROOM = TierRoom(capacity=1 << 20, nbytes=0, blocks=0, policy="lru")


def view(session: str, t: int) -> View:
    box = Box((t, 0, 0, 0), (t, 0, 0, 0))
    return View((session, "turb", "u", 0.0), VARIABLE, box, "lorenzo", "neighbourhood", False, ROOM, ROOM,
                64, 0)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_positions_move_and_plans_are_made_on_the_planning_thread(sample_store):
    watched = {Position.observe_box.__code__, Position.plan.__code__, Position._score.__code__}
    threads: set[str] = set()

    def profile(frame, event, arg):  # noqa: ANN001, ANN202 - a profile function's signature
        if event == "call" and frame.f_code in watched:
            threads.add(threading.current_thread().name)

    threading.setprofile(profile)  # every thread started from here on: the server's loop, the planner
    try:
        service = BlockService([ZarrOrigin(sample_store)], l3="4MiB", l4="4MiB", prefetch="auto")
        with ServerThread(service) as server:
            for t in range(4):  # a session moving on every request: a plan each time
                status, _ = get(f"{server.url}/datasets/turb/blocks/u/{t}.0.0.0",
                                {"X-Tierscope-Session": "s", "X-Tierscope-Position": f"{t}.0.0.0;{t}.1.1.1"})
                assert status == 200
            stats = json.loads(get(f"{server.url}/stats")[1])
    finally:
        threading.setprofile(None)
    assert stats["prefetch"]["planned"] > 0 and stats["sessions"] == 1
    assert threads == {THREAD_NAME}  # none of it on the loop's thread


def test_a_request_that_moves_no_position_plans_nothing(sample_store):
    """``X-Tierscope-Moves: no`` (a progressive view's coarse part, docs/protocol.md): the blocks are
    served as user requests, but the session keeps no position and nothing is planned, on every route."""
    from tierscope.client.http import HttpTransport

    service = BlockService([ZarrOrigin(sample_store)], l3="4MiB", l4="4MiB", prefetch="auto")
    with ServerThread(service) as server:
        transport = HttpTransport(server.url)
        blocks = [(1, 0, 0, 0), (1, 1, 1, 1)]
        view = {"session": "s", "position": blocks}
        try:
            transport.fetch("turb", "u", blocks[0], 0.0, **view, moves=False)
            transport.fetch_many("turb", "u", blocks, 0.0, **view, moves=False)
            assert len(list(transport.fetch_each("turb", "u", blocks, 0.0, **view, moves=False))) == 2
            stats = service.stats()
            assert stats["requests"]["user"] == 5 and stats["sessions"] == 0
            assert stats["prefetch"]["planned"] == 0
            transport.fetch_many("turb", "u", blocks, 0.0, **view)  # a view: it moves the position
            stats = service.stats()
            assert stats["sessions"] == 1 and stats["prefetch"]["planned"] > 0
        finally:
            transport.close()


def test_a_bad_moves_header_is_a_400_naming_it(server):
    status, body = get(f"{server.url}/datasets/turb/blocks/u/0.0.0.0", {"X-Tierscope-Moves": "0"})
    assert status == 400 and "X-Tierscope-Moves must be yes or no" in json.loads(body)["error"], body


def test_a_position_is_planned_once_at_its_newest_view():
    delivered = []
    planner = Planner(delivered.append)
    for each in (view("a", 0), view("b", 0), view("a", 2)):  # a moves on before anything is planned
        planner.observe(each)
    assert planner.issued == 2
    planner.start()
    try:
        assert wait_for(lambda: delivered and delivered[-1].done == 2)
    finally:
        planner.stop()
    plans = [d.planned for d in delivered if d.planned is not None]
    assert [p.key[0] for p in plans] == ["a", "b"]
    a, _ = planner.sessions.position(plans[0].key, VARIABLE.grid)
    assert (a.views, a.box) == (1, view("a", 2).box)  # observed once, at the newest view
    fresh = Position(VARIABLE.grid)
    fresh.observe_box(view("a", 2).box)
    expected = fresh.plan("neighbourhood", ROOM.radius(VARIABLE, fresh), limit=64)
    assert [item.index for item in plans[0].items] == expected


def test_the_oldest_waiting_views_are_dropped_past_the_cap():
    delivered = []
    planner = Planner(delivered.append, max_pending=2)
    for session in "abc":
        planner.observe(view(session, 1))
    planner.start()
    try:
        assert wait_for(lambda: delivered and delivered[-1].done == 3)  # a dropped, b and c planned
    finally:
        planner.stop()
    assert [d.planned.key[0] for d in delivered if d.planned is not None] == ["b", "c"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's context switches: /proc (Linux)")
def test_a_request_repeating_its_view_does_not_wake_the_planner(sample_store):
    def planners() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == THREAD_NAME}

    def planner_switches() -> int:
        (planner,) = planners() - others  # this service's (earlier tests may leave others running)
        with open(f"/proc/self/task/{planner.native_id}/status") as status:
            return int(status.read().split("voluntary_ctxt_switches:")[1].split()[0])

    others = planners()
    service = BlockService([ZarrOrigin(sample_store)], l3="4MiB", l4="4MiB", prefetch="auto")
    with ServerThread(service) as server:
        headers = {"X-Tierscope-Session": "s", "X-Tierscope-Position": "1.0.0.0;1.1.1.1"}
        url = f"{server.url}/datasets/turb/blocks/u/1.0.0.0"
        assert get(url, headers)[0] == 200
        assert wait_for(lambda: service._planned == service._planner.issued)  # the view planned
        before = planner_switches()
        for _ in range(40):  # the same view: nothing to plan
            assert get(url, headers)[0] == 200
        woken = planner_switches() - before
        stats = json.loads(get(f"{server.url}/stats")[1])  # takes the waiting views first
    assert woken < 5  # once a request before: 40 or more
    assert stats["sessions"] == 1 and service._planned == service._planner.issued


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("0.0.0.0;9.0.0.0", "X-Tierscope-Position: block index (9, 0, 0, 0) is out of range on axis 0"),
        ("0.0.0.0;1.0.0", "X-Tierscope-Position: block index (1, 0, 0) has 3 axes, expected 4"),
        ("0.0.0.0;;1.0.0.0", "malformed X-Tierscope-Position block ''"),
        ("1" * 10 + ".0.0.0", "malformed X-Tierscope-Position block"),
        (";".join(["0.0.0.0"] * 65), "X-Tierscope-Position lists 65 blocks, at most 64 allowed"),
    ],
)
def test_a_bad_position_header_is_a_400_naming_it(server, header, message):
    status, body = get(f"{server.url}/datasets/turb/blocks/u/0.0.0.0", {"X-Tierscope-Position": header})
    assert status == 400 and message in json.loads(body)["error"], body


def test_a_position_header_with_spaces_is_read_block_by_block(server):
    spaced = {"X-Tierscope-Position": "0.0.0.0; 1.1.1.1"}
    assert get(f"{server.url}/datasets/turb/blocks/u/0.0.0.0", spaced)[0] == 200


def test_a_server_process_lets_its_loop_take_the_gil_back_within_half_a_millisecond(sample_store):
    from tierscope.server.service import GIL_SWITCH_S

    # run_server (what `tierscope serve` runs) lowers its process's interval; an embedded service leaves
    # its host process's alone
    code = ("import sys; from tierscope.server import BlockService, run_server; "
            "from tierscope.store.origin import ZarrOrigin; "
            f"service = BlockService([ZarrOrigin({str(sample_store)!r})]); "
            "print(sys.getswitchinterval(), flush=True); "
            "run_server(service, '127.0.0.1', 0, ready=lambda url: sys.exit(print(sys.getswitchinterval())))")
    before, after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   timeout=60).stdout.split()
    assert float(before) == 0.005 and float(after) == GIL_SWITCH_S == 0.0005  # CPython's default is 5 ms


def test_a_server_process_freezes_its_start_up_heap_out_of_the_collector(sample_store):
    # its modules' objects are never traversed again by a full collection; an embedded service's host
    # process keeps its collector as it was
    code = ("import gc, sys; from tierscope.server import BlockService, run_server; "
            "from tierscope.store.origin import ZarrOrigin; "
            f"service = BlockService([ZarrOrigin({str(sample_store)!r})]); "
            "print(gc.get_freeze_count(), flush=True); "
            "run_server(service, '127.0.0.1', 0, ready=lambda url: sys.exit(print(gc.get_freeze_count(), "
            "len(gc.get_objects()))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=60).stdout.split()
    before, frozen, tracked = map(int, out)
    assert before == 0 and frozen > 10_000 and tracked < frozen / 10


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop is a dependency on Linux and macOS only")
def test_servers_run_on_uvloop(sample_store):
    # its C transports cost the loop less CPU per request (docs/server.md, "Concurrency"): a server
    # process's loop and an embedded server thread's
    code = ("import sys, aiohttp.web; from tierscope.server import BlockService, run_server; "
            "from tierscope.store.origin import ZarrOrigin; "
            "aiohttp.web.run_app = lambda app, loop, **kw: sys.exit(print(type(loop).__module__)); "
            f"run_server(BlockService([ZarrOrigin({str(sample_store)!r})]), '127.0.0.1', 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["uvloop"]
    with ServerThread(BlockService([ZarrOrigin(sample_store)])) as server:
        assert type(server._loop).__module__ == "uvloop"
        assert get(f"{server.url}/datasets")[0] == 200


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads have their own nice value on Linux")
def test_prefetch_threads_run_nicer_than_the_loop_and_user_threads(sample_store):
    from tierscope.server.service import PREFETCH_NICE

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    service = BlockService([ZarrOrigin(sample_store)])
    with ServerThread(service) as server:
        async def nices() -> tuple[int, int, int]:
            loop = asyncio.get_running_loop()
            return (nice(), await loop.run_in_executor(service._user_pool, nice),
                    await loop.run_in_executor(service._prefetch_pool, nice))

        loop_nice, user, prefetch = asyncio.run_coroutine_threadsafe(nices(), server._loop).result(10)
    assert loop_nice == user == os.getpriority(os.PRIO_PROCESS, 0)
    assert prefetch == min(loop_nice + PREFETCH_NICE, 19)
