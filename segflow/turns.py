"""Turns on one device shared by an actor's shards: the oldest shard waiting goes first.

An actor runs two shards at once (``workers.segment_actor``) so that one shard's ramp (its
first images fetched and decoded, before its first forward pass) and tail (its last host
work, its tables built and written, the round trip to the driver) overlap the other's
forward passes. Under a plain lock the two shards take alternate turns, advance in step and
end together: then both tails and both of the next shards' ramps fall in the same interval,
and the device idles through them (0.4–0.6 s every two shards of 256 1080p images, measured
with the emulated device of ``bench/device_feed.py``).

:class:`DeviceTurns` gives the device to the *oldest* shard that is waiting for it (each
shard draws a ticket when it starts: :meth:`DeviceTurns.shard`). The younger shard takes a
turn only when the older one is not ready: its next batch still being decoded, or its
forward passes done. So the older shard runs ahead and ends while the younger one is in its
stride, the younger one prefetches (at most its prefetch depth) and fills the device during
the older one's tail and the next shard's ramp. No turn is lost: the device is handed on the
moment it is released, to whichever shard is waiting; a shard is never left waiting while the
device is free.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from types import TracebackType


class DeviceTurns:
    """A lock on one device, taken by its waiters in the order their shards started."""

    def __init__(self) -> None:
        self._tickets = itertools.count()
        self._changed = threading.Condition()
        self._held = False
        self._waiting: list[int] = []  # a heap of the waiters' tickets

    def shard(self) -> Turn:
        """The turns of a shard starting now: a context manager held around each of its
        forward passes; it waits behind shards that started earlier."""
        return Turn(self, next(self._tickets))

    def _acquire(self, ticket: int) -> None:
        with self._changed:
            heapq.heappush(self._waiting, ticket)
            while self._held or self._waiting[0] != ticket:
                self._changed.wait()
            heapq.heappop(self._waiting)
            self._held = True

    def _release(self) -> None:
        with self._changed:
            self._held = False
            self._changed.notify_all()


class Turn:
    """One shard's turns on a :class:`DeviceTurns` (``with turn: forward pass``)."""

    def __init__(self, turns: DeviceTurns, ticket: int) -> None:
        self._turns = turns
        self.ticket = ticket

    def __enter__(self) -> None:
        self._turns._acquire(self.ticket)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._turns._release()
