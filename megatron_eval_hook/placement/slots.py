"""The snapshot queue of the async placement: at most `max_pending + 1` host copies of the model.

A slot is one host buffer for a whole snapshot. It is `filling` while the training ranks copy
their shards into it, `pending` once complete and waiting for the eval process, `loading` while
the eval process copies it into its model, and `free` again right after (the evaluation itself
runs on the eval process's own copy). At most `max_pending` snapshots are filling or pending;
with one more slot for the eval process to load from, the buffers never exceed
`max_pending + 1`.

When the queue is full, the policy decides: `latest` takes the place of the oldest complete
snapshot waiting (which the caller records as skipped); `all` makes the caller wait for room.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FREE, FILLING, PENDING, LOADING = "free", "filling", "pending", "loading"


@dataclass
class Slot:
    index: int
    buffer: Any = None
    state: str = FREE
    job: Any = None  # what the snapshot in it is for (the caller's object, e.g. the save event)
    order: int = 0  # when it was taken: the oldest pending snapshot is the first replaced and loaded


@dataclass(frozen=True)
class Taken:
    slot: Slot
    replaced: list[Any]  # jobs of the waiting snapshots this one replaced
    waited_s: float  # time spent waiting for room


class Slots:
    """The queue; thread-safe. `make_buffer()` creates the buffers when the first snapshot comes."""

    def __init__(self, max_pending: int, policy: str, make_buffer: Callable[[], Any]):
        if policy not in ("latest", "all"):
            raise ValueError(f"policy {policy!r}: use latest or all")
        self.max_pending = max_pending
        self.policy = policy
        self._make_buffer = make_buffer
        self._slots = [Slot(i) for i in range(max_pending + 1)]
        self._changed = threading.Condition()
        self._taken = 0
        self._closed = False

    @property
    def buffers(self) -> int:
        """Host buffers allocated so far."""
        return sum(slot.buffer is not None for slot in self._slots)

    def _in(self, *states: str) -> list[Slot]:
        return sorted((slot for slot in self._slots if slot.state in states), key=lambda slot: slot.order)

    def take(self, job: Any, wait: bool = True) -> Taken:
        """A slot to copy a new snapshot into (state `filling`). Under `all` (or `latest` with only
        snapshots still being filled ahead) waits for room; `wait=False` replaces the oldest waiting
        snapshot even under `all` (an exiting job must not wait for an evaluation)."""
        started = time.perf_counter()
        with self._changed:
            while True:
                if self._closed:
                    raise RuntimeError("the snapshot queue is closed")
                free, queued, pending = self._in(FREE), self._in(FILLING, PENDING), self._in(PENDING)
                replaced: list[Slot] = []
                if free and len(queued) < self.max_pending:
                    slot = free[0]
                elif (self.policy == "latest" or not wait) and pending:
                    oldest = pending[0]
                    slot = free[0] if free else oldest
                    replaced = [oldest]
                else:
                    self._changed.wait()
                    continue
                jobs = [old.job for old in replaced]
                for old in replaced:
                    old.state, old.job = FREE, None
                if slot.buffer is None:  # the first snapshot: all at once, not in the middle of training
                    for each in self._slots:
                        each.buffer = self._make_buffer()
                self._taken += 1
                slot.state, slot.job, slot.order = FILLING, job, self._taken
                return Taken(slot, jobs, time.perf_counter() - started)

    def filled(self, slot: Slot, job: Any) -> None:
        """The snapshot of `job` in `slot` is complete: it waits for the eval process (unless it was
        dropped meanwhile)."""
        with self._changed:
            if slot.job is job and slot.state == FILLING:
                slot.state = PENDING
                self._changed.notify_all()

    def next(self, timeout: float | None = None) -> Slot | None:
        """The oldest complete snapshot, now `loading`; None when none came within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self._in(PENDING):
                remaining = None if deadline is None else deadline - time.monotonic()
                if self._closed or (remaining is not None and remaining <= 0):
                    return None
                self._changed.wait(remaining)
            slot = self._in(PENDING)[0]
            slot.state = LOADING
            self._changed.notify_all()  # the queue has room now
            return slot

    def release(self, slot: Slot, job: Any) -> None:
        """The eval process is done with the snapshot of `job` in `slot` (it loaded it, or it never will):
        free the slot, unless it was freed already and holds a newer snapshot by now."""
        with self._changed:
            if slot.job is job and slot.state != FREE:
                slot.state, slot.job = FREE, None
                self._changed.notify_all()

    def drop_waiting(self) -> list[Any]:
        """Free every snapshot not yet loaded; return their jobs (oldest first)."""
        with self._changed:
            dropped = self._in(FILLING, PENDING)
            jobs = [slot.job for slot in dropped]
            for slot in dropped:
                slot.state, slot.job = FREE, None
            self._changed.notify_all()
            return jobs

    def idle(self) -> bool:
        """No snapshot is being filled, waiting or loading."""
        with self._changed:
            return not self._in(FILLING, PENDING, LOADING)

    def wait_changed(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Wake every waiter; later `take` calls raise and `next` returns None."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
