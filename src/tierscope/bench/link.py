"""Link emulation: a shaping TCP proxy on loopback that makes a local server look remote.

``LinkProxy`` listens on 127.0.0.1 (an ephemeral port) and forwards every connection to a target, both
directions shaped like one link: a rate limit per direction (``LinkClock``, a token bucket in its
virtual-scheduling form), shared by all connections (so parallel connections split the bandwidth as they
would on a wire), and a one-way delay added to each chunk after it has been "transmitted". Delivery is
pipelined (many chunks in flight at once), so throughput is set by the bandwidth, not by the delay (no
stop-and-wait); a small request/response pays about one RTT (2 x delay) more than it would directly.

``parse_link`` reads the CLI's ``--link`` values: ``"1gbit,0.1ms"``, ``"100mbit,20ms"`` or ``"none"``.
Rates count bits per second in SI units (as tc does for ``mbit``); delays take ``us``, ``ms`` or ``s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import selectors
import threading
from dataclasses import dataclass

__all__ = ["Link", "LinkClock", "LinkProxy", "parse_link"]

CHUNK = 64 * 1024  # most bytes read and booked at a time (a chunk arrives whole, when its last bit would)
# Transmission booked ahead of real time, per direction: a stall of the proxy's thread up to this long
# costs no rate, while a new connection's first bytes queue behind at most this much of others' data.
SLACK_S = 0.02
STOP_TIMEOUT = 10.0

_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_DELAY_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


@dataclass(frozen=True, slots=True)
class Link:
    """A link's bandwidth (bits per second) and one-way delay (seconds)."""

    bandwidth_bps: float
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bandwidth_bps) and self.bandwidth_bps > 0):
            raise ValueError(f"link bandwidth must be a positive number of bit/s, got {self.bandwidth_bps}")
        if not (math.isfinite(self.delay_s) and self.delay_s >= 0):
            raise ValueError(f"link delay must be >= 0 seconds, got {self.delay_s}")

    def __str__(self) -> str:
        return f"{self.bandwidth_bps / 1e6:g}mbit,{self.delay_s * 1e3:g}ms"


def parse_link(text: str) -> Link | None:
    """``"RATE[,DELAY]"`` (``"100mbit,20ms"``) as a ``Link``; ``"none"`` as None (no proxy in between)."""
    spec = text.strip().lower()
    if spec == "none":
        return None
    match = re.fullmatch(rf"{_NUMBER}\s*([a-z]+)\s*(?:,\s*{_NUMBER}\s*([a-z]+))?", spec)
    if match is None:
        raise ValueError(f"link {text!r}: expected RATE[,DELAY] like '100mbit,20ms', or 'none'")
    rate, rate_unit, delay, delay_unit = match.groups()
    if rate_unit not in _RATE_UNITS:
        raise ValueError(f"link {text!r}: rate unit {rate_unit!r} is not one of {', '.join(_RATE_UNITS)}")
    if delay is not None and delay_unit not in _DELAY_UNITS:
        raise ValueError(f"link {text!r}: delay unit {delay_unit!r} is not one of {', '.join(_DELAY_UNITS)}")
    seconds = 0.0 if delay is None else float(delay) * _DELAY_UNITS[delay_unit]
    return Link(float(rate) * _RATE_UNITS[rate_unit], seconds)


class LinkClock:
    """When each chunk of one link direction finishes crossing it: a token bucket in its virtual-scheduling
    form (GCRA, bucket depth one chunk), shared by all connections of that direction.

    ``send(n)`` books n bytes right after everything already booked (or now, if the link went idle) and
    returns the time their last bit leaves. Delivery waits for these absolute times, so a late wake-up of
    the event loop is caught up by the chunks booked behind it instead of being lost rate, and an idle
    link earns no burst.
    """

    def __init__(self, rate_bytes: float) -> None:
        self.rate = float(rate_bytes)
        self._free_at = -math.inf

    def ahead(self, now: float) -> float:
        """Seconds of transmission already booked beyond ``now``."""
        return max(0.0, self._free_at - now)

    def send(self, nbytes: int, now: float) -> float:
        self._free_at = max(now, self._free_at) + nbytes / self.rate
        return self._free_at


class LinkProxy:
    """Forward 127.0.0.1:``port`` to ``target_host:target_port`` through an emulated link.

    >>> with LinkProxy("127.0.0.1", server.port, 100e6, 0.020) as link:   # doctest: +SKIP
    ...     requests.get(f"{link.url}/datasets")
    """

    def __init__(self, target_host: str, target_port: int, bandwidth_bps: float,
                 delay_s: float = 0.0) -> None:
        self.link = Link(float(bandwidth_bps), float(delay_s))
        self.target = (target_host, int(target_port))
        self.host, self.port = "127.0.0.1", 0
        rate = self.link.bandwidth_bps / 8
        self._clocks = {"up": LinkClock(rate), "down": LinkClock(rate)}
        # Chunks in flight per connection and direction: the bandwidth-delay product plus what may be
        # booked ahead, so the delay line never throttles below the rate; a receiver that stops reading
        # still pushes back on its sender.
        self._queue_size = 2 + math.ceil(rate * (self.link.delay_s + SLACK_S) / CHUNK)
        self.bytes = {"up": 0, "down": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    @classmethod
    def for_link(cls, link: Link, target_host: str, target_port: int) -> LinkProxy:
        return cls(target_host, target_port, link.bandwidth_bps, link.delay_s)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def active(self) -> int:
        """Connections being forwarded now."""
        return len(self._handlers)

    def start(self) -> LinkProxy:
        if self._thread is not None:
            raise RuntimeError("LinkProxy already started")
        # select() takes its timeout in microseconds where epoll rounds up to whole milliseconds: a 0.1 ms
        # one-way delay would otherwise cost 1 ms or more per hop. A proxy holds few sockets, so select's
        # descriptor limit does not bite.
        self._loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tierscope-link")
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=STOP_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Stop listening, cut every forwarded connection, stop the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(TimeoutError):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=STOP_TIMEOUT)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=STOP_TIMEOUT)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- forwarding (on the proxy's loop) -----------------------------------------------------------

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        server_writer = None
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
            up: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(self._queue_size)
            down: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(self._queue_size)
            parts = [
                asyncio.create_task(self._transmit(client_reader, up, "up")),
                asyncio.create_task(self._deliver(up, server_writer)),
                asyncio.create_task(self._transmit(server_reader, down, "down")),
                asyncio.create_task(self._deliver(down, client_writer)),
            ]
            try:
                # Normally all four end after both ends closed; a reset on either side ends the lot.
                await asyncio.wait(parts, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for part in parts:
                    part.cancel()
                await asyncio.gather(*parts, return_exceptions=True)
        except OSError:
            pass  # target down, or a side went away mid-transfer: only this connection is dropped
        except asyncio.CancelledError:
            pass  # stop() cuts the connection; asyncio 3.11 would log a cancelled handler as an error
        finally:
            if server_writer is not None:
                server_writer.close()
            client_writer.close()
            self._handlers.discard(task)

    async def _transmit(self, reader: asyncio.StreamReader, queue: asyncio.Queue, direction: str) -> None:
        """Read one direction, book each chunk on the shared link clock, queue it for delivery when due."""
        clock, loop = self._clocks[direction], asyncio.get_running_loop()
        while True:
            data = await reader.read(CHUNK)
            if data:
                wait = clock.ahead(loop.time()) - SLACK_S
                if wait > 0:
                    await asyncio.sleep(wait)
                sent = clock.send(len(data), loop.time())
            else:
                sent = loop.time()
            self.bytes[direction] += len(data)
            await queue.put((sent + self.link.delay_s, data))
            if not data:
                return

    @staticmethod
    async def _deliver(queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        """Write queued chunks in order once due (all that are due in one go); an empty chunk passes the
        sender's half-close on."""
        loop = asyncio.get_running_loop()
        item = await queue.get()
        while True:
            wait = item[0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            while item is not None and item[0] <= loop.time():
                if not item[1]:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(item[1])
                item = None if queue.empty() else queue.get_nowait()
            await writer.drain()
            if item is None:
                item = await queue.get()

