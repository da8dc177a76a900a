"""Server prefetch reads and encodes in child processes (``BlockService(prefetch_loads="process")``): the
same tiers, byte for byte, as the prefetch threads fill, levels included; a dead child hands the work back
to the threads; origins a location does not describe stay in threads. Real servers on loopback, real
child processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import urllib.request

import numpy as np

from tierscope import codec
from tierscope.server import BlockService, ServerThread
from tierscope.server.loads_process import OriginSpec, origin_spec
from tierscope.store.origin import ZarrOrigin, open_origin

from conftest import GatedOrigin, wait_for

SAMPLE = "sample://turb?shape=4,64,64,64&block=1,16,32,32&levels=2"


def view(server: ServerThread, service: BlockService, dataset: str, t: int) -> None:
    """A user's view of one block at step ``t`` whose position steers prefetch; then wait until every
    planned block is loaded (nothing queued, nothing running)."""
    headers = {"X-Tierscope-Session": "s", "X-Tierscope-Position": f"{t}.0.0.0;{t}.1.0.0"}
    url = f"{server.url}/datasets/{dataset}/blocks/u/{t}.0.0.0?tol=0.01"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as response:
        assert response.status == 200

    def drained() -> bool:
        prefetch = service.stats()["prefetch"]
        ended = prefetch["issued"] + prefetch["skipped"] + prefetch["cancelled"] + prefetch["expired"]
        return (prefetch["queued"] == 0 and ended == prefetch["planned"]
                and service._slots._value == service.prefetch_workers)

    assert wait_for(drained, timeout=60), service.stats()["prefetch"]


def tiers(service: BlockService) -> tuple[dict, dict]:
    l3 = {key: service.l3.peek(key).frame for key in service.l3.keys()}
    l4 = {key: service.l4.peek(key).array for key in service.l4.keys()}
    return l3, l4


def test_prefetch_loads_in_children_fill_the_tiers_as_the_threads_do(tmp_path):
    origin = open_origin(SAMPLE)
    filled, stats = {}, {}
    for loads in ("thread", "process"):
        service = BlockService([open_origin(SAMPLE)], l3="64MiB", l4="64MiB", prefetch="neighbourhood",
                               prefetch_loads=loads, plan_ttl=60)
        with ServerThread(service) as server:
            for dataset in ("turb", "turb@1"):  # level 0, then a coarse level (its own origin in a child)
                for t in (0, 2):
                    view(server, service, dataset, t)
            if loads == "process":
                pids = service._loads.pids
                assert len(pids) == service.prefetch_workers
                assert all(os.getpriority(os.PRIO_PROCESS, pid) == 19 for pid in pids)
            filled[loads] = tiers(service)
            stats[loads] = service.stats()
    assert filled["process"][0].keys() == filled["thread"][0].keys()
    assert filled["process"][1].keys() == filled["thread"][1].keys()
    for key, frame in filled["process"][0].items():
        assert frame == filled["thread"][0][key], key  # the same frame, byte for byte
    for key, raw in filled["process"][1].items():
        dataset, variable, index = key
        np.testing.assert_array_equal(raw, origin.level(1 if dataset.endswith("@1") else 0)
                                      .read_block(variable, index))
        assert not raw.flags.writeable
    prefetched = [s["prefetch"]["issued"] for s in stats.values()]
    assert prefetched[0] == prefetched[1] > 8 and stats["process"]["prefetch"]["errors"] == 0
    assert stats["process"]["encodes"] == stats["thread"]["encodes"]
    assert stats["process"]["config"]["prefetch_loads"] == "process"
    some = next(iter(filled["process"][0].items()))
    (dataset, variable, tol, _, index), frame = some
    truth = origin.level(1 if dataset.endswith("@1") else 0).read_block(variable, index)
    assert np.abs(codec.decode(frame) - truth).max() <= tol


def test_a_dead_load_process_hands_prefetch_back_to_the_threads(caplog):
    service = BlockService([open_origin(SAMPLE)], l3="64MiB", l4="64MiB", prefetch="neighbourhood",
                           prefetch_loads="process", plan_ttl=60)
    with caplog.at_level(logging.ERROR, "tierscope.server.service"), ServerThread(service) as server:
        view(server, service, "turb", 0)
        for pid in service._loads.pids:
            os.kill(pid, signal.SIGKILL)
        view(server, service, "turb", 3)  # the first load finds the pool broken: threads do it and the rest
        assert service._loads is None
        stats = service.stats()
        assert stats["prefetch"]["errors"] == 0
        assert {key[2] for key in service.l4.keys()} >= {(3, 1, 0, 0), (0, 1, 0, 0)}
    assert [r.message for r in caplog.records] == [
        "a prefetch load process died: prefetch reads and encodes go on in threads"]


def test_the_load_processes_end_when_the_server_process_is_killed():
    code = ("import time; from tierscope.server import BlockService, ServerThread; "
            "from tierscope.store.origin import open_origin; "
            f"service = BlockService([open_origin({SAMPLE!r})], prefetch='auto', prefetch_loads='process'); "
            "server = ServerThread(service).start(); "
            "print(*service._loads.pids, flush=True); time.sleep(120)")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        children = [int(pid) for pid in server.stdout.readline().split()]
        assert len(children) == 2
    finally:
        server.send_signal(signal.SIGKILL)  # no shutdown: the pool's queue stays open for its children
        server.wait(timeout=30)

    def ended(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    assert wait_for(lambda: all(map(ended, children)), timeout=20)


def test_only_origins_their_location_describes_go_to_a_child(sample_store):
    zarr = ZarrOrigin(sample_store)
    assert origin_spec(zarr) == OriginSpec(str(sample_store), "turb", 0)
    assert origin_spec(open_origin(SAMPLE).level(1)) == OriginSpec(SAMPLE, "turb", 1)
    gated = GatedOrigin(zarr, lambda level, index: False)
    assert origin_spec(gated) is None  # reads differently from what its location opens
    remote = ZarrOrigin(f"file://{sample_store}", storage_options={"auto_mkdir": False})
    assert origin_spec(remote) is None  # the options are not in the location
