"""Server-side prefetch planning in a child process of its own (``BlockService(planner="process")``).

The planning thread (``planner.py``) keeps the work off the loop, but not off the GIL: a plan is ~1 ms
of mostly Python, and a thread holding the GIL while the OS runs something else (the prefetch threads
are niced) makes the loop wait for it. Here the same ``Planner`` logic (its ``_observe``: the positions,
the coalescing, the epochs) runs in a child process at nice ``NICE``, which shares no GIL with the loop:

- the loop hands each view over as a compact tuple, its variable's ``VariableInfo`` once per variable,
  into a batch keyed by position (a newer view of a position replaces its older one in place, at most
  ``max_pending`` wait); a view that moves its position sends the batch, one pickle and one non-blocking
  write to the child's stdin; one that does not (``wake=False``) waits for the next that does, or for
  ``wake``; what the pipe does not take at once goes when it is writable (``loop.add_writer``), and past
  ``MAX_UNSENT`` bytes unsent, batches are dropped (counted as finished);
- the child reads what has arrived, coalesces it per position as the planning thread does, plans the
  oldest position, and writes the result to its stdout: the plan's block indices, the views that changed;
- a reader thread in the server turns each result into a ``Delivery`` for the loop's ``_apply``
  (``loop.call_soon_threadsafe``): the same path as the planning thread's.

The child is a ``python -c`` that nices itself, then imports NumPy and the planning modules, not the
server's (``tierscope.server`` imports its modules lazily). It ends when its stdin closes (``stop``, or
the server process dying, however) or its stdout does; if it dies first, the reader logs an error, the
views waiting count as finished (``settled`` returns), and prefetch planning stops while requests go on
being served. The child plans without the thread's rest (``planning.REST``): at nice 19 it runs on CPU
time nothing else wants, and views arriving meanwhile coalesce.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tierscope
from tierscope.cache import Views
from tierscope.prefetch import Box
from tierscope.server.planner import Delivery, Planned, Planner, TierRoom, View
from tierscope.server.sessions import PositionKey, PrefetchItem

__all__ = ["NICE", "ProcessPlanner"]

logger = logging.getLogger(__name__)

NICE = 19  # the child's OS priority: it plans only on CPU time the server and its clients leave
MAX_UNSENT = 1 << 20  # bytes of views the pipe has not taken yet, at most; beyond, batches are dropped
_LENGTH = struct.Struct("<I")  # each message on either pipe: its length, then a pickle


def _read_exactly(fd: int, n: int) -> bytes | None:
    """``n`` bytes from ``fd`` (blocking), or None at end of file."""
    parts = []
    while n:
        part = os.read(fd, n)
        if not part:
            return None
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _read_message(fd: int) -> Any:
    """The next message on ``fd``, or None at end of file."""
    head = _read_exactly(fd, _LENGTH.size)
    body = None if head is None else _read_exactly(fd, _LENGTH.unpack(head)[0])
    return None if body is None else pickle.loads(body)  # from our own child or parent: trusted


def _frame(message: Any) -> bytes:
    body = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ------------------------------------------------------------------------------------ the child
def _child(inp: int, out: int, max_positions: int, max_pending: int) -> None:
    """Read views from ``inp``, plan them with ``Planner._observe``, write results to ``out``; until EOF."""
    planner = Planner(lambda delivery: None, max_positions)  # its thread is never started
    variables: dict[tuple[str, str], Any] = {}
    waiting: OrderedDict[PositionKey, tuple] = OrderedDict()
    done = 0  # views received and finished (planned, replaced or dropped)

    def receive(messages: list[tuple]) -> None:
        nonlocal done
        for message in messages:
            if message[0] == "variable":
                variables[message[1]] = message[2]
                continue
            key = message[1]
            done += key in waiting  # the view it replaces is finished
            waiting[key] = message
            while len(waiting) > max_pending:
                waiting.popitem(last=False)
                done += 1

    while True:
        if not waiting:  # wait for views
            messages = _read_message(inp)
            if messages is None:
                return
            receive(messages)
        while select.select([inp], [], [], 0)[0]:  # take whatever else has arrived: newer views coalesce
            messages = _read_message(inp)
            if messages is None:
                return
            receive(messages)
        _, (_, key, lo, hi, codec, mode, distance, l3, l4, limit, epoch) = waiting.popitem(last=False)
        try:
            view = View(key, variables[key[1:3]], Box(lo, hi), codec, mode, distance, TierRoom(*l3),
                        TierRoom(*l4), limit, epoch)
            planned = planner._observe(view)
        except Exception:  # a bad view must never stop planning
            logger.warning("planning %r failed", key, exc_info=True)
            planned = None
        done += 1
        if planned is None and waiting:  # as the planning thread: nothing changed, more to do
            continue
        result = None
        if planned is not None:  # compact: indices and flags, not PrefetchItems and Views
            items = None if planned.items is None else [(item.index, item.to_l3) for item in planned.items]
            views = {variable: None if v is None else ([(box.lo, box.hi) for box in v.boxes], v.time_axis)
                     for variable, v in planned.views.items()}
            result = (planned.key, planned.epoch, planned.dropped, items, views, codec)
        _write_all(out, _frame((result, done, len(planner.sessions), planner._epoch)))


# The child's command: niced before it imports anything (NumPy and the planning modules: ~0.3 s of CPU),
# and importing the tierscope this process did (its directory put first on the path, unless on it already)
_CHILD = ("import os, sys; os.nice(%d); root = %%r; sys.path[:0] = [] if root in sys.path else [root]; "
          "from tierscope.server.planner_process import main; main(sys.argv[1:])" % NICE)


def main(argv: list[str]) -> None:
    """The child's entry (``_CHILD``): ``argv`` is MAX_POSITIONS MAX_PENDING."""
    logging.basicConfig(format="tierscope planner process %(process)d: %(levelname)s %(message)s")
    inp, out = sys.stdin.fileno(), os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not corrupt the results
    try:
        _child(inp, out, int(argv[0]), int(argv[1]))
    except (BrokenPipeError, KeyboardInterrupt):  # the server went away
        pass


# ------------------------------------------------------------------------------ the server side
class ProcessPlanner:
    """``planner.Planner``'s interface (``start``, ``stop``, ``observe``, ``wake``, ``issued``), planning
    in a child process; everything but the reader thread runs on the service's loop."""

    def __init__(self, deliver: Callable[[Delivery], object], max_positions: int = 1024,
                 max_pending: int = 1024) -> None:
        """``deliver(delivery)`` runs on the loop (``start``'s), like ``_apply``."""
        self._deliver = deliver
        self.max_positions, self.max_pending = max_positions, max_pending
        self._variables: list[tuple] = []  # VariableInfos not sent yet
        self._known: set[tuple[str, str]] = set()
        self._batch: OrderedDict[PositionKey, tuple] = OrderedDict()  # views not sent yet, per position
        self._unsent = bytearray()  # sent, but not taken by the pipe yet
        self._issued = 0  # views queued (those replacing one in the batch not counted)
        self._lost = 0  # views dropped here: counted as finished
        self._done = 0  # the child's count, as it last said
        self._positions = self._epoch = 0
        self._ended = False  # the child is gone: views are ignored
        self._stopping = False
        self._writing = False  # waiting for the pipe to be writable
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def issued(self) -> int:
        return self._issued

    @property
    def alive(self) -> bool:
        return self.process is not None and not self._ended

    def start(self) -> None:
        """Start the child and the reader thread; on the loop that then owns this planner."""
        self._loop = asyncio.get_running_loop()
        root = str(Path(tierscope.__file__).resolve().parents[1])
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD % root, str(self.max_positions), str(self.max_pending)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._in = self.process.stdin.fileno()
        os.set_blocking(self._in, False)
        self._reader = threading.Thread(target=self._read, name="tierscope-planner-reader", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        """End the child (it finishes the view it is planning) and the reader; on the loop, briefly."""
        if self.process is None:
            return
        self._stopping = True
        self._loop.remove_writer(self._in)
        self.process.stdin.close()  # the child reads EOF and exits
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)
        self.process.stdout.close()

    def observe(self, view: View, wake: bool = True) -> None:
        """Queue ``view`` (O(1)): it replaces a view of its position not sent yet; ``wake``: send them."""
        if self._ended:
            return
        variable = view.key[1:3]
        if variable not in self._known:
            self._known.add(variable)
            self._variables.append(("variable", variable, view.variable))
        if view.key not in self._batch:
            self._issued += 1
        l3, l4 = view.l3, view.l4
        self._batch[view.key] = ("view", view.key, view.box.lo, view.box.hi, view.codec, view.mode,
                                 view.distance, (l3.capacity, l3.nbytes, l3.blocks, l3.policy),
                                 (l4.capacity, l4.nbytes, l4.blocks, l4.policy), view.limit, view.epoch)
        while len(self._batch) > self.max_pending:
            self._batch.popitem(last=False)
            self._lost += 1
        if wake:
            self.wake()

    def wake(self) -> None:
        """Send the views waiting (one message); dropped if the pipe is MAX_UNSENT behind."""
        if not self._batch or self._ended:
            return
        if len(self._unsent) > MAX_UNSENT:  # the child is not keeping up (or stuck): plans are for now
            self._lost += len(self._batch)
            self._batch.clear()
            self._report()
            return
        self._unsent += _frame([*self._variables, *self._batch.values()])
        self._variables.clear()
        self._batch.clear()
        if not self._writing:
            self._write()

    def _write(self) -> None:
        try:
            sent = os.write(self._in, self._unsent)
        except BlockingIOError:
            sent = 0
        except OSError:  # the child is gone: the reader reports it
            self._unsent.clear()
            return
        del self._unsent[:sent]
        if self._unsent and not self._writing:
            self._writing = True
            self._loop.add_writer(self._in, self._writable)

    def _writable(self) -> None:
        self._loop.remove_writer(self._in)
        self._writing = False
        self._write()

    def _report(self) -> None:
        """Hand the loop a delivery with nothing planned: the views finished so far."""
        self._deliver(Delivery(None, self._done + self._lost, self._positions, self._epoch))

    def _read(self) -> None:
        """The reader thread: the child's results to the loop, until its stdout ends."""
        out = self.process.stdout.fileno()
        while True:
            try:
                message = _read_message(out)
            except (OSError, ValueError, EOFError, pickle.UnpicklingError):
                message = None
            if message is None:
                break
            result, done, positions, epoch = message
            planned = None
            if result is not None:
                key, planned_epoch, dropped, items, views, codec = result
                _, dataset, variable, tol = key
                plan = None if items is None else [PrefetchItem(dataset, variable, index, tol, codec, near)
                                                   for index, near in items]
                planned = Planned(key, planned_epoch, dropped, plan,
                                  {v: None if boxes is None else Views(*boxes) for v, boxes in views.items()})
            try:
                self._loop.call_soon_threadsafe(self._delivered, Delivery(planned, done, positions, epoch))
            except RuntimeError:  # the loop is closed
                return
        if not self._stopping:
            try:
                self._loop.call_soon_threadsafe(self._child_ended)
            except RuntimeError:
                pass

    def _delivered(self, delivery: Delivery) -> None:
        self._done, self._positions, self._epoch = delivery.done, delivery.positions, delivery.epoch
        self._deliver(Delivery(delivery.planned, delivery.done + self._lost, delivery.positions,
                               delivery.epoch))

    def _child_ended(self) -> None:
        """On the loop: the child died. Every view so far counts as finished; no more are taken."""
        if self._stopping:
            return
        try:
            code: int | None = self.process.wait(timeout=1)  # its stdout closed: it exits
        except subprocess.TimeoutExpired:
            code = None
        logger.error(
            "the prefetch planner process (pid %d) ended unexpectedly (exit status %s): prefetch planning "
            "stops, requests are still served", self.process.pid, code)
        self._ended = True
        self._batch.clear()
        self._unsent.clear()
        if self._writing:
            self._loop.remove_writer(self._in)
            self._writing = False
        self._lost = self._issued - self._done  # every view issued is finished
        self._positions = 0
        self._report()

