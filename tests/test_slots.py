"""The async placement's snapshot queue: its policies and its bound on host memory."""

from __future__ import annotations

import threading
import time

import pytest

from megatron_eval_hook.placement.slots import FILLING, LOADING, PENDING, Slots


def queue(max_pending: int, policy: str) -> Slots:
    return Slots(max_pending, policy, make_buffer=object)


def complete(slots: Slots, job) -> None:
    slots.filled(slots.take(job).slot, job)


def test_latest_replaces_the_oldest_waiting_snapshot():
    slots = queue(1, "latest")
    complete(slots, 1)
    loading = slots.next()  # the eval process takes 1
    complete(slots, 2)
    taken = slots.take(3)
    assert taken.replaced == [2] and taken.waited_s < 0.1
    slots.filled(taken.slot, 3)
    slots.release(loading, 1)
    assert slots.next().job == 3


def test_latest_keeps_max_pending_snapshots_waiting():
    slots = queue(2, "latest")
    slots.next(timeout=0)
    for job in (1, 2):
        complete(slots, job)
    taken = slots.take(3)
    assert taken.replaced == [1]
    slots.filled(taken.slot, 3)
    assert [slots.next().job for _ in range(2)] == [2, 3]


def test_all_waits_for_room_and_reports_the_wait():
    slots = queue(1, "all")
    complete(slots, 1)
    loading = slots.next()
    complete(slots, 2)
    threading.Timer(0.3, lambda: slots.release(loading, 1)).start()  # 1 is loaded: 2 leaves the queue next
    threading.Timer(0.3, slots.next).start()
    taken = slots.take(3)
    assert taken.replaced == [] and taken.waited_s > 0.2


def test_all_does_not_wait_when_the_job_is_exiting():
    slots = queue(1, "all")
    complete(slots, 1)
    slots.next()
    complete(slots, 2)
    assert slots.take(3, wait=False).replaced == [2]


@pytest.mark.parametrize("policy", ["latest", "all"])
@pytest.mark.parametrize("max_pending", [1, 3])
def test_host_memory_never_exceeds_max_pending_plus_one_snapshots(policy, max_pending):
    slots = queue(max_pending, policy)
    states = []

    def evaluate():
        while (slot := slots.next(timeout=2)) is not None:
            states.append([s.state for s in slots._slots])
            time.sleep(0.002)
            slots.release(slot, slot.job)

    worker = threading.Thread(target=evaluate)
    worker.start()
    for job in range(200):
        slot = slots.take(job).slot
        states.append([s.state for s in slots._slots])
        slots.filled(slot, job)
    worker.join()
    assert slots.buffers <= max_pending + 1
    assert all(sum(s in (FILLING, PENDING) for s in row) <= max_pending for row in states)
    assert all(sum(s == LOADING for s in row) <= 1 for row in states)


def test_a_slot_freed_and_taken_again_is_not_freed_by_its_previous_job():
    slots = queue(1, "latest")
    complete(slots, 1)
    loading = slots.next()
    slots.release(loading, 1)  # loaded: free while 1 is still evaluated
    taken = slots.take(2)
    slots.release(loading, 1)  # the evaluation of 1 ends
    assert taken.slot.state == FILLING and taken.slot.job == 2


def test_a_dropped_snapshot_completed_later_does_not_come_back():
    slots = queue(1, "latest")
    taken = slots.take(1)
    assert slots.drop_waiting() == [1]  # e.g. the job stops while a rank's shards are still arriving
    slots.filled(taken.slot, 1)
    assert slots.next(timeout=0) is None
