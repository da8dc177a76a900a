"""The block server's memory stays bounded whatever clients do (a real `tierscope serve` process)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tierscope.server.limits import ByteBudget, ServerBusyError

DATASET = "sample://big?shape=1,64,1024,1024&block=1,64,64,64&variables=u"  # 256 blocks of 1 MiB
BATCH = {"variable": "u", "tol": 1e-3, "blocks": [[0, 0, y, x] for y in range(16) for x in range(16)]}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@pytest.fixture
def served():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tierscope = str(Path(sys.executable).with_name("tierscope"))
    proc = subprocess.Popen([tierscope, "serve", DATASET, "--port", str(port), "--l3", "1GiB", "--l4", "1GiB"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get(f"{url}/datasets", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
                time.sleep(0.2)
        yield url, port, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_clients_that_never_read_their_batches_cannot_exhaust_memory(served):
    url, port, pid = served
    request = urllib.request.Request(f"{url}/datasets/big/batch", data=json.dumps(BATCH).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:  # load and encode the blocks once
        assert len(response.read()) > 256 * 16_000
    before = rss_bytes(pid)
    body = json.dumps(BATCH).encode()
    head = (f"POST /datasets/big/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    stalled = []
    try:
        for _ in range(150):  # each asks for 256 frames (~35 MB) and never reads a byte
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(head + body)
            stalled.append(sock)
        time.sleep(3)
        started = time.monotonic()
        assert json.loads(get(f"{url}/datasets"))  # other clients are still served, at once
        assert len(get(f"{url}/datasets/big/blocks/u/0.0.3.3?tol=0.001")) > 16_000
        assert time.monotonic() - started < 5
        grown = rss_bytes(pid) - before
        assert grown < 300 << 20, f"resident memory grew by {grown >> 20} MiB"
    finally:
        for sock in stalled:
            sock.close()
    assert json.loads(get(f"{url}/datasets"))


def test_the_budget_makes_requests_wait_then_refuses_them():
    async def scenario() -> tuple[int, int, bool]:
        budget = ByteBudget(capacity=100, wait_s=0.2)
        order = []

        async def second() -> None:
            async with budget.hold(60):
                order.append("second")

        async with budget.hold(80) as charge:
            waiter = asyncio.create_task(second())
            await asyncio.sleep(0.05)
            assert order == []  # 80 + 60 > 100: it waits
            charge.shrink(30)  # part of the first answer is written
            await asyncio.sleep(0.05)
            assert order == ["second"]
        await waiter
        used_after = budget.used
        async with budget.hold(100):
            try:
                async with budget.hold(1):
                    pass
            except ServerBusyError:
                refused = True
        return used_after, budget.used, refused

    assert asyncio.run(scenario()) == (0, 0, True)
