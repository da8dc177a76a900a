"""Shared fixtures: a real sample store, a real block server on loopback, a real LocalCluster."""

from __future__ import annotations

import threading
import time

import pytest

from tierscope.store.origin import Origin

SHAPE = (4, 16, 32, 32)
BLOCK = (1, 8, 16, 16)


def wait_for(predicate, timeout=10.0):
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


class GatedOrigin(Origin):
    """Another origin's blocks, the order of reads recorded; a read for which ``gated(level, index)`` holds
    waits for ``gate`` (``held`` says one is waiting), so queued work stays queued until the test opens
    it. Its coarse levels are the other origin's, behind the same gate."""

    def __init__(self, origin, gated, level=0, shared=None):
        self.origin, self.name, self.location, self.path = origin, origin.name, origin.location, None
        self._levels = {}
        self.gated, self._k = gated, level  # not ``level``: Origin.level(k) opens a level
        self.gate, self.held, self.reads, self._lock = shared or (
            threading.Event(), threading.Event(), [], threading.Lock())

    def info(self):
        return self.origin.info()

    def _open_level(self, k, name):
        return GatedOrigin(self.origin._open_level(k, name), self.gated, k,
                           (self.gate, self.held, self.reads, self._lock))

    def read_block(self, variable, index):
        if self.gated(self._k, index):
            self.held.set()
            self.gate.wait(20)
        with self._lock:
            self.reads.append(tuple(index))
        return self.origin.read_block(variable, index)


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory: pytest.TempPathFactory):
    from tierscope.store import write_sample

    return write_sample(tmp_path_factory.mktemp("data") / "turb.zarr", shape=SHAPE, block=BLOCK,
                        variables=("u", "v", "p"), seed=1)


@pytest.fixture(scope="session")
def server(sample_store):
    from tierscope.server import BlockService, ServerThread
    from tierscope.store.origin import ZarrOrigin

    with ServerThread(BlockService([ZarrOrigin(sample_store)])) as running:
        yield running


@pytest.fixture(scope="session")
def dataset_url(server) -> str:
    return f"{server.url}/datasets/turb"


@pytest.fixture(scope="session")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                      dashboard_address=None) as running:
        yield running


@pytest.fixture
def client(cluster):
    """A client on the shared cluster with fresh tiers (no prefetch: counts stay those of the views)."""
    from distributed import Client

    import tierscope

    with Client(cluster) as c:
        tierscope.connect(c, l1="64MiB", l2="128MiB", prefetch="off")
        yield c


@pytest.fixture(scope="session")
def levels_store(tmp_path_factory: pytest.TempPathFactory):
    """A sample with levels 0..2: a (16, 32, 32) space of (8, 8, 8) blocks, so a whole z-slice is 16
    blocks at level 0, 4 at level 1 and 1 at level 2."""
    from tierscope.store import pyramid, write_sample

    store = write_sample(tmp_path_factory.mktemp("levels") / "turb.zarr", shape=(3, 16, 32, 32),
                         block=(1, 8, 8, 8), variables=("u", "v", "p"), seed=3)
    assert pyramid(store) == 3
    return store


@pytest.fixture(scope="session")
def levels_url(levels_store) -> str:
    """``levels_store`` served by a real block server on loopback."""
    from tierscope.server import BlockService, ServerThread
    from tierscope.store.origin import ZarrOrigin

    with ServerThread(BlockService([ZarrOrigin(levels_store)])) as running:
        yield f"{running.url}/datasets/turb"
