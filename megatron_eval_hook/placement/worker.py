"""The async placement's eval process: `python -m megatron_eval_hook.placement.worker FD PARENT_PID DEVICE`.

Started by the training process that owns the run's W&B run (the last rank), outside the
`torch.distributed` world of training: it makes a world of one of its own, so it can never take
part in a training collective. It builds the run's model without tensor or pipeline parallelism
on its device, once, and for each job loads a snapshot from shared host memory into it (or, for a
save a restarted job found lacking results, its checkpoint from disk) and runs the same evaluation as
the sync placement (ledger rows written here; the scores sent back to the
training process, whose W&B run and TensorBoard writer log them).

Messages on the socket FD (pickled, `multiprocessing.connection`):
  to the worker:   init dict; ("buffer", slot, nbytes) followed by the buffer's file descriptor;
                   ("evaluate", Job); ("stop",)
  from the worker: ("ready", benchmark names) | ("error", message); per job: ("begun", iteration),
                   ("loaded", iteration), ("scores", iteration, values), ("done", iteration, error, recycle)
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from pathlib import Path
from typing import Any

logger = logging.getLogger("megatron_eval_hook")


@dataclass(frozen=True)
class Job:
    """One save to evaluate: a snapshot in a slot, or (`folder`) a checkpoint on disk."""

    iteration: int
    tokens: int | None
    blocked_s: float | None  # how long training waited for this snapshot (None: it did not wait)
    slot: int | None
    folder: str | None = None  # the checkpoint to read the weights from, instead of a slot
    only: list[str] | None = None  # the benchmarks to evaluate (None: all)


class ParentSink:
    """Sends the scores to the training process, which logs them to W&B and TensorBoard."""

    def __init__(self, connection: Connection):
        self.connection = connection

    def log(self, iteration: int, values: dict[str, float]) -> None:
        self.connection.send(("scores", iteration, values))

    def close(self) -> None:
        pass


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the training process ends, however it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _select_device(device: str) -> None:
    """Make `device` (as the training process names it) this process's only visible device."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    index = int(device.partition(":")[2] or 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)


def serve(connection: Connection, device: str) -> None:
    # Before the first message: unpickling Megatron's arguments imports Megatron.
    _select_device(device)
    import torch

    if not torch.cuda.is_available():
        from megatron_eval_hook import cpu_shims

        cpu_shims.apply()
    init = connection.recv()
    from megatron_eval_hook.config import EvalHookConfig
    from megatron_eval_hook.evaluator import Evaluator
    from megatron_eval_hook.ledger import Ledger
    from megatron_eval_hook.loading import CheckpointModel
    from megatron_eval_hook.log import log_to_stdout
    from megatron_eval_hook.snapshot import SharedBuffer, load_snapshot

    log_to_stdout("[eval-hook]")
    config: EvalHookConfig = init["config"]
    try:
        evaluator = Evaluator(
            config,
            init["benchmarks"],
            run=init["run"],
            output_dir=Path(init["output_dir"]),
            ledger=Ledger(init["ledger"]),
            max_sequence_length=init["max_sequence_length"],
            placement="async",
            sinks=[ParentSink(connection)],
            where=init["where"],
            megatron_args=init["megatron_args"],
        )
        model = CheckpointModel(init["megatron_args"], Path(init["where"]))
    except Exception as error:
        connection.send(("error", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", evaluator.benchmark_names))
    buffers: dict[int, SharedBuffer] = {}
    shards: list = []
    while True:
        message = connection.recv()
        if message[0] == "stop":
            return
        if message[0] == "buffer":
            _, slot, nbytes = message
            buffers[slot] = SharedBuffer(nbytes, fd=recv_handle(connection))
            continue
        if message[0] == "shards":
            shards = message[1]
            continue
        job: Job = message[1]

        def job_model(job: Job = job, shards: list = shards) -> tuple[Any, Any]:
            connection.send(("begun", job.iteration))  # the ledger rows are open
            if job.folder is not None:
                model.load(Path(job.folder))
            else:
                load_snapshot(model.gpt, shards, buffers[job.slot].tensor)
            connection.send(("loaded", job.iteration))
            return model.gpt, model.tokenizer

        try:
            evaluator.evaluate(job.iteration, job.tokens, job_model, only=job.only)
        except Exception as error:  # recorded in the ledger by the evaluator; start afresh for the next one
            connection.send(("done", job.iteration, f"{type(error).__name__}: {error}", True))
            return
        evaluator.publish(job.iteration, blocked_s=job.blocked_s)
        failed = ", ".join(evaluator.failed)
        # A failed benchmark may leave state behind (HELM's, the model's): the next job gets a fresh process.
        connection.send(("done", job.iteration, f"failed: {failed}" if failed else None, bool(failed)))


def main() -> None:
    fd, parent, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    _die_with_parent()
    if os.getppid() != parent:  # the training process ended before the line above took effect
        sys.exit(1)
    connection = Connection(fd)
    try:
        serve(connection, device)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the training process closed the connection: nothing left to do


if __name__ == "__main__":
    main()
