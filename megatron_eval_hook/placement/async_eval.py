"""Async placement: training waits only for the weight copy; an eval process of its own does the rest.

Right after a scheduled save, every training rank copies its main-replica shards into host
memory (`snapshot.py`) and goes back to training:
- the last rank (the one holding Megatron's W&B run) copies into a snapshot slot, shared memory
  the eval process can map (`slots.py`: at most `max_pending + 1` slots);
- any other rank copies into a buffer of its own, and a background thread sends it to the last
  rank over a gloo group of the hook's own, where a receiving thread writes it into the slot.
A manager thread on the last rank hands complete snapshots to the eval process (`worker.py`,
started once at install, outside the `torch.distributed` world of training), watches it (death,
`eval_timeout_s`), restarts it when needed, and records in the ledger what the process could not.
The scores come back to the last rank, whose main thread logs them to W&B and TensorBoard
between training iterations and at the end of training, where pending evaluations may take up
to `finish_timeout_s` more.

A restarted job's saves that lack results (the one it resumes from, and the earlier ones of its
--save folder) go to the eval process before any new snapshot: it reads their weights from their
checkpoints, while training runs.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from pathlib import Path
from typing import Any

import torch

import megatron_eval_hook
from megatron_eval_hook.checkpoints import CheckpointError, iteration_folder, read_args, tokens_seen
from megatron_eval_hook.config import ConfigError, EvalHookConfig
from megatron_eval_hook.helm.benchmarks import Benchmark
from megatron_eval_hook.ledger import Ledger
from megatron_eval_hook.placement import SaveEvent
from megatron_eval_hook.placement.slots import Slot, Slots
from megatron_eval_hook.placement.sync import unwrap_chunks
from megatron_eval_hook.placement.worker import Job
from megatron_eval_hook.sinks import Deliveries, training_sinks
from megatron_eval_hook.snapshot import Shard, SharedBuffer, copy_into, extent, main_replicas, moved

logger = logging.getLogger("megatron_eval_hook")

READY_TIMEOUT_S = 1800.0  # the eval process imports HELM and Megatron and builds its model
STOP_TIMEOUT_S = 30.0


@dataclass
class Snapshot:
    """A save whose snapshot is in a slot, waiting to be evaluated."""

    iteration: int
    tokens: int | None
    blocked_s: float | None = 0.0
    broken: str | None = None  # why this rank's shards could not be copied: never evaluated
    folder: str | None = None  # a save of an earlier job, evaluated from its checkpoint: no slot
    only: list[str] | None = None  # the benchmarks it lacks (None: all)


class EvalProcess:
    """The eval process: started, fed jobs, watched, stopped."""

    def __init__(self, init: dict[str, Any]):
        self.init = init
        self.process: subprocess.Popen | None = None
        self.connection: Connection | None = None
        self._buffers: set[int] = set()  # slots whose buffer this process has mapped
        self._has_shards = False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> list[str]:
        """Start the process; return its benchmark names once its model is built. Raises ConfigError
        with the process's own message when it cannot start (a bad config, data, model)."""
        ours, theirs = socket.socketpair()
        package_root = str(Path(megatron_eval_hook.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "megatron_eval_hook.placement.worker"]
        command += [str(theirs.fileno()), str(os.getpid()), self.init["device"]]
        self.process = subprocess.Popen(command, pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.connection = Connection(ours.detach())
        self._buffers, self._has_shards = set(), False
        try:
            self.connection.send(self.init)
            message = self.receive(READY_TIMEOUT_S)
        except (EOFError, OSError):
            message = None
        if message is None or message[0] != "ready":
            self.kill()
            reason = message[1] if message else f"it did not start ({self.exit_cause()}; its error is above)"
            raise ConfigError(f"the async eval process cannot evaluate this run: {reason}")
        logger.info("eval process %d ready on %s", self.pid, self.init["device"])
        return list(message[1])

    def receive(self, timeout: float) -> tuple | None:
        """The next message; None on timeout. Raises EOFError when the process ended."""
        assert self.connection is not None
        if not self.connection.poll(timeout):
            return None
        return self.connection.recv()

    def submit(self, job: Job, slot: Slot | None, shards: list[Shard]) -> None:
        """Send `job`, and before it what the process needs to read its slot (none for a checkpoint on disk)."""
        assert self.connection is not None
        if slot is None:
            self.connection.send(("evaluate", job))
            return
        if not self._has_shards:
            self.connection.send(("shards", shards))
            self._has_shards = True
        if slot.index not in self._buffers:
            self.connection.send(("buffer", slot.index, slot.buffer.nbytes))
            send_handle(self.connection, slot.buffer.fd, self.process.pid)
            self._buffers.add(slot.index)
        self.connection.send(("evaluate", job))

    def exit_cause(self) -> str:
        if self.process is None:
            return "not started"
        code = self.process.poll()
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exited with status {code}"

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close_connection()

    def stop(self) -> None:
        if self.alive:
            try:
                self.connection.send(("stop",))
                self.process.wait(STOP_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _close_connection(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class AsyncPlacement:
    """The training side of the async placement, on every rank; the eval process on the last."""

    name = "async"

    def __init__(
        self,
        config: EvalHookConfig,
        benchmarks: list[Benchmark],
        *,
        run: str,
        output_dir: Path,
        ledger_path: Path,
        max_sequence_length: int,
        megatron_args: Any,
        config_path: str,
        rank: int,
        world_size: int,
        evaluating_rank: int,
    ):
        self.config = config
        self.run = run
        self.rank, self.world_size, self.evaluating_rank = rank, world_size, evaluating_rank
        self._sources: list[tuple[Shard, torch.Tensor]] | None = None  # this rank's shards, on the first save
        self._group = None
        self._finished = False
        if rank != evaluating_rank:
            self._staging: torch.Tensor | None = None
            self._to_send: queue.SimpleQueue = queue.SimpleQueue()
            self._sent = threading.Event()
            self._sent.set()
            return
        _check_device(config.eval_device, where=f"--eval-hook-config {config_path}")
        self.ledger = Ledger(ledger_path)
        self.sinks = training_sinks(config, run=run, output_dir=output_dir, megatron_args=megatron_args)
        self.deliveries = Deliveries(self.sinks, self.ledger, run, config.wandb.log_all_metrics)
        self.process = EvalProcess(
            {
                "config": config,
                "benchmarks": benchmarks,
                "run": run,
                "output_dir": str(output_dir),
                "ledger": str(ledger_path),
                "max_sequence_length": max_sequence_length,
                "megatron_args": _picklable(megatron_args),
                "device": config.eval_device,
                "where": f"--eval-hook-config {config_path}",
            }
        )
        self.benchmark_names = self.process.start()
        self.slots = Slots(config.max_pending, config.pending_policy, self._new_buffer)
        self._shards: list[Shard] = []  # every rank's shards, as laid out in a slot
        self._senders: list[tuple[int, int, int]] = []  # (rank, first byte in a slot, bytes) of the other ranks
        self._own_base = 0
        self._to_receive: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._from_disk: queue.SimpleQueue = queue.SimpleQueue()  # earlier saves a restarted job found lacking
        self.save_dir = Path(megatron_args.save)
        self._in_flight: Snapshot | None = None
        self._begun = False  # whether the eval process opened the ledger rows of the evaluation in flight
        self._abort: str | None = None  # why the evaluation in flight is to be stopped
        self._skipping: str | None = None  # why no snapshot is evaluated any more (the job is stopping)
        self._manager = threading.Thread(target=self._manage, name="eval-hook-manager", daemon=True)
        self._manager.start()
        atexit.register(self._at_exit)

    @property
    def is_evaluating_rank(self) -> bool:
        return self.rank == self.evaluating_rank

    # --- the training side: every rank, in the training loop ---

    def at_save(self, event: SaveEvent, model: Any) -> None:
        """Every rank: snapshot the weights just saved; training goes on while the eval process evaluates."""
        try:
            self.submit(event.iteration, event.tokens, model, exiting=event.exiting)
        except Exception:  # an evaluation must never kill training
            logger.exception("snapshot at iteration %d failed", event.iteration)

    def before_load(self, iterations: list[int], load: Any, model: Any) -> None:
        """The last rank, before a restarted job loads the save it resumes from: the earlier saves in `iterations`
        that lack results go to the eval process, which reads them from their checkpoints while training runs."""
        if self.is_evaluating_rank:
            for iteration in iterations:
                self._from_checkpoint(iteration, "saved before the one resumed from")

    def at_load(self, event: SaveEvent, model: Any) -> None:
        """The last rank: the save this job resumed from, if it lacks results, goes to the eval process, which
        reads it from its checkpoint while training runs."""
        if self.is_evaluating_rank:
            self._from_checkpoint(event.iteration, "resumed from", event.tokens)

    def _from_checkpoint(self, iteration: int, which: str, tokens: int | None = None) -> None:
        """Queue the save of `iteration` for the eval process, from its checkpoint, with the benchmarks it lacks
        (those failed `resume.max_attempts` times are not retried)."""
        only = self.ledger.lacking(self.run, iteration, self.benchmark_names, self.config.resume.max_attempts)
        if not only:
            return
        folder = iteration_folder(self.save_dir, iteration)
        if tokens is None:
            try:
                tokens = tokens_seen(read_args(folder))
            except CheckpointError:
                pass  # reading its weights fails too, and is recorded with the reason
        self._from_disk.put(Snapshot(iteration, tokens, blocked_s=None, folder=str(folder), only=only))
        logger.info("iteration %d (%s): %s, which it lacks, evaluated from its checkpoint in the eval process",
                    iteration, which, only)  # fmt: skip

    def at_log(self) -> None:
        """Log a score that arrived (the last rank's main thread, between iterations)."""
        self.publish(at_most=1)

    def at_end(self, exiting: bool) -> None:
        """Let the pending evaluations finish; on the exit signal (`exiting`), record them as not done."""
        self.finish(exiting=exiting)

    def submit(self, iteration: int, tokens: int | None, model: Any, exiting: bool = False) -> float:
        """Copy this rank's shards of `model` (Megatron's model chunks) into host memory and queue the
        snapshot of `iteration`; return the seconds training was blocked. `exiting`: the job is
        stopping, so do not wait for room (the snapshot is then recorded as not evaluated)."""
        started = time.perf_counter()
        if self._sources is None:
            self._prepare(model)
        if not self.is_evaluating_rank:
            if self._sources:
                self._sent.wait()  # the previous snapshot has left this rank's buffer
                copy_into(self._staging, self._sources)
                self._sent.clear()
                self._to_send.put(iteration)
            return time.perf_counter() - started
        snapshot = Snapshot(iteration, tokens)
        # Even when nothing more is evaluated, the other ranks' shards are received (they send them).
        taken = self.slots.take(snapshot, wait=not (exiting or self._skipping))
        for replaced in taken.replaced:
            self._record(
                "skipped",
                replaced,
                f"replaced by the snapshot of iteration {iteration} before the eval process was free "
                f"(pending_policy=latest, max_pending={self.config.max_pending})",
            )
        if self._skipping is None:
            try:
                copy_into(taken.slot.buffer.tensor, self._sources, base=self._own_base)
            except Exception as error:  # the other ranks' shards are still received, to keep them in step
                snapshot.broken = f"the snapshot of the weights could not be copied: {type(error).__name__}: {error}"
                logger.exception("iteration %d: %s", iteration, snapshot.broken)
        snapshot.blocked_s = time.perf_counter() - started
        if self._senders:
            self._to_receive.put(taken.slot)
        else:
            self._filled(taken.slot, snapshot)
        return snapshot.blocked_s

    def _filled(self, slot: Slot, snapshot: Snapshot) -> None:
        """The snapshot in `slot` is complete: it waits for the eval process, unless it is broken."""
        if snapshot.broken is None:
            self.slots.filled(slot, snapshot)
            return
        self._record("failed", snapshot, snapshot.broken)
        self.slots.release(slot, snapshot)

    def _prepare(self, model: Any) -> None:
        """On the first snapshot, on every rank: find this rank's shards; the last rank learns everyone's."""
        self._sources = main_replicas(unwrap_chunks(model))
        own = [shard for shard, _ in self._sources]
        layouts = [own]
        if self.world_size > 1:
            import torch.distributed as dist

            # A group of the hook's own with a long timeout: no training collective waits on it.
            self._group = dist.new_group(backend="gloo", timeout=timedelta(hours=24))
            layouts = [None] * self.world_size if self.is_evaluating_rank else None
            dist.gather_object(own, layouts, dst=self.evaluating_rank, group=self._group)
        if not self.is_evaluating_rank:
            if own:
                self._staging = torch.empty(extent(own), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
                threading.Thread(target=self._send, name="eval-hook-sender", daemon=True).start()
            return
        base = 0
        for rank, shards in enumerate(layouts):
            if not shards:
                continue
            self._shards += moved(shards, base)
            if rank == self.rank:
                self._own_base = base
            else:
                self._senders.append((rank, base, extent(shards)))
            base += extent(shards)
        self._slot_bytes = base
        if self._senders:
            threading.Thread(target=self._receive, name="eval-hook-receiver", daemon=True).start()
        logger.info(
            "async evaluation: snapshots of %.1f MB from %d rank(s), at most %d in host memory",
            base / 1e6,
            len(self._senders) + bool(own),
            self.config.max_pending + 1,
        )

    def _new_buffer(self) -> SharedBuffer:
        return SharedBuffer(self._slot_bytes)

    def _send(self) -> None:
        import torch.distributed as dist

        while True:
            iteration = self._to_send.get()
            try:
                dist.send(self._staging, dst=self.evaluating_rank, group=self._group)
            except Exception:  # the last rank records the snapshot as failed; training must not wait on it
                logger.exception("rank %d: sending the snapshot of iteration %d failed", self.rank, iteration)
            finally:
                self._sent.set()

    def _receive(self) -> None:
        import torch.distributed as dist

        while True:
            slot = self._to_receive.get()
            snapshot = slot.job
            try:
                for rank, base, nbytes in self._senders:
                    dist.recv(slot.buffer.tensor[base : base + nbytes], src=rank, group=self._group)
            except Exception as error:  # an incomplete snapshot is never evaluated
                logger.exception("receiving the snapshot of iteration %d failed", snapshot.iteration)
                self._record("failed", snapshot, f"the snapshot did not arrive from every rank: {error}")
                self.slots.release(slot, snapshot)
                continue
            self._filled(slot, snapshot)

    # --- the eval process, watched from the manager thread of the last rank ---

    def _next(self) -> tuple[Slot | None, Snapshot] | None:
        """The next save to evaluate: a checkpoint on disk first (no slot), else the oldest complete snapshot;
        None once the queue is closed."""
        while True:
            try:
                return None, self._from_disk.get_nowait()
            except queue.Empty:
                pass
            slot = self.slots.next(timeout=0.5)
            if slot is not None:
                return slot, slot.job
            if self.slots.closed:
                return None

    def _manage(self) -> None:
        while True:
            taken = self._next()
            if taken is None:
                return  # closed
            slot, snapshot = taken
            self._in_flight, self._begun = snapshot, False
            try:
                if self._skipping is not None:
                    self._record("skipped", snapshot, self._skipping)
                else:
                    self._evaluate(slot, snapshot)
            except Exception as error:  # never let the manager die: the next save must still be evaluated
                logger.exception("async evaluation of iteration %d failed", snapshot.iteration)
                self._fail(snapshot, f"{type(error).__name__}: {error}", begun=self._begun)
            finally:
                if slot is not None:
                    self.slots.release(slot, snapshot)
                self._in_flight = None

    def _evaluate(self, slot: Slot | None, snapshot: Snapshot) -> None:
        if not self.process.alive:
            try:
                self.process.start()
            except ConfigError as error:
                self._fail(snapshot, f"the eval process could not be restarted: {error}", begun=False)
                return
        index = None if slot is None else slot.index
        job = Job(snapshot.iteration, snapshot.tokens, snapshot.blocked_s, index, snapshot.folder, snapshot.only)
        self.process.submit(job, slot, self._shards)
        deadline = time.monotonic() + self.config.eval_timeout_s
        while True:
            if self._abort is not None:
                self.process.kill()
                self._fail(snapshot, self._abort, self._begun)
                return
            if time.monotonic() > deadline:
                self.process.kill()
                self._fail(
                    snapshot,
                    f"timed out: still running after eval_timeout_s={self.config.eval_timeout_s:g} s; the eval "
                    "process was stopped and starts afresh for the next save",
                    self._begun,
                )
                return
            try:
                message = self.process.receive(0.2)
            except (EOFError, OSError):
                self.process.kill()  # reaps it, so its exit status is known
                self._fail(
                    snapshot,
                    f"the eval process died ({self.process.exit_cause()}) during this evaluation; it starts "
                    "afresh for the next save",
                    self._begun,
                )
                return
            if message is None:
                continue
            kind = message[0]
            if kind == "begun":
                self._begun = True  # the eval process opened the ledger rows
            elif kind == "loaded" and slot is not None:
                self.slots.release(slot, snapshot)
            elif kind == "scores":
                self._results.put((message[1], message[2]))
            elif kind == "done":
                _, _, error, recycle = message
                if recycle:
                    logger.warning("iteration %d: %s; the eval process starts afresh", snapshot.iteration, error)
                    self.process.stop()
                return

    def _fail(self, snapshot: Snapshot, reason: str, begun: bool) -> None:
        logger.warning("iteration %d: not evaluated: %s", snapshot.iteration, reason)
        if begun:  # the process opened the ledger rows: close those it left running
            self.ledger.fail_running(self.run, snapshot.iteration, reason)
        else:
            self._record("failed", snapshot, reason)

    def _record(self, status: str, snapshot: Snapshot, reason: str) -> None:
        record = self.ledger.record_failed if status == "failed" else self.ledger.record_skipped
        for name in snapshot.only or self.benchmark_names:
            record(self.run, snapshot.iteration, name, reason, placement=self.name, tokens=snapshot.tokens)
        if status == "skipped":
            logger.info("iteration %d: not evaluated: %s", snapshot.iteration, reason)

    # --- results and the end of training: the main thread of the last rank ---

    def publish(self, at_most: int | None = None) -> None:
        """Log the scores that arrived (`at_most` evaluations of them) to the sinks (W&B, TensorBoard).

        While training runs, one per training step: each takes a W&B row of its own, and W&B has one
        row per step (more would push its step past Megatron's next one, whose rows W&B would drop)."""
        if not self.is_evaluating_rank:
            return
        budget = at_most if at_most is not None else sys.maxsize
        while budget > 0:
            try:
                iteration, values = self._results.get_nowait()
            except queue.Empty:
                break
            self.deliveries.send(iteration, values)
            budget -= 1
        if at_most is None:
            self.deliveries.flush()
        elif budget > 0:
            self.deliveries.deliver(budget)  # what a sink still lacks, in the rows left this step

    def finish(self, exiting: bool = False) -> None:
        """At the end of training: let the pending evaluations finish (up to `finish_timeout_s`; not at
        all when `exiting` on a signal), log them, record the rest as not done, stop the eval process."""
        if not self.is_evaluating_rank:
            self._sent.wait()  # the last rank still needs this rank's last snapshot
            return
        if self._finished:
            return
        if exiting:
            # Ranks see the signal at different saves: this one keeps receiving the others' snapshots,
            # recording each as skipped, until the process exits.
            self._skip_from_now(
                "the job received its exit signal and is stopping: not evaluated (megatron-eval backfill "
                "evaluates this save later)"
            )
            return
        self._finished = True
        timeout = self.config.finish_timeout_s
        if not self._idle():
            logger.info("end of training: waiting up to %g s for the pending evaluations", timeout)
        self.wait(timeout)  # training is over: Megatron logs no more steps, every score can go now
        self._stop(f"not finished within finish_timeout_s={timeout:g} s after the end of training")

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every snapshot to be evaluated, logging the scores as they
        come; return whether all were."""
        deadline = time.monotonic() + timeout
        while not self._idle() and time.monotonic() < deadline:
            self.publish()
            self.slots.wait_changed(0.2)
        self.publish()
        return self._idle()

    def _idle(self) -> bool:
        return self._in_flight is None and self.slots.idle() and self._from_disk.empty()

    def _drop_waiting(self) -> list[Snapshot]:
        """Every save not yet handed to the eval process (checkpoints on disk first), now dropped."""
        dropped = []
        while not self._from_disk.empty():
            dropped.append(self._from_disk.get_nowait())
        return dropped + self.slots.drop_waiting()

    def _skip_from_now(self, reason: str) -> None:
        """Record what is pending as not done and stop the evaluation in flight, with `reason`, and evaluate
        nothing more (the eval process is stopped)."""
        if self._skipping is None:
            self._skipping = self._abort = reason
            for snapshot in self._drop_waiting():
                self._record("skipped", snapshot, reason)

    def _stop(self, reason: str) -> None:
        """Record what is still pending or running as not done (with `reason`), stop the eval process."""
        self._abort = reason  # the manager stops the evaluation in flight, if any, and records it failed
        for snapshot in self._drop_waiting():
            self._record("skipped", snapshot, reason)
        self.slots.close()
        self._manager.join(STOP_TIMEOUT_S)
        self.process.stop()
        self.publish()

    def _at_exit(self) -> None:
        if not self._finished:
            self._finished = True
            self._stop(self._skipping or "the training process exited before this evaluation finished")


def _picklable(args: Any) -> Any:
    """A copy of Megatron's argument namespace without the values another process cannot receive."""
    import argparse

    kept = {}
    for name, value in vars(args).items():
        try:
            pickle.dumps(value)
        except Exception:
            continue
        kept[name] = value
    return argparse.Namespace(**kept)


def _check_device(device: str, where: str) -> None:
    """Refuse an eval device that does not exist or that training uses on this node."""
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"{where}: eval_device={device!r}, but this node has no CUDA device. Fix: eval_device=cpu.")
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"{where}: eval_device={device!r}, but this node has {count} CUDA device(s) (cuda:0..cuda:{count - 1}). "
            "Fix: name one of them."
        )
    training = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if index < training:
        raise ConfigError(
            f"{where}: eval_device={device!r} is used by training: this node runs {training} training process(es) "
            f"on cuda:0..cuda:{training - 1}. Fix: reserve a GPU for evaluation (e.g. run {count - 1} processes per "
            f"node with eval_device=cuda:{count - 1}), or eval_device=cpu."
        )
