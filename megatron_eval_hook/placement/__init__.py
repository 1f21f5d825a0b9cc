"""Where an evaluation runs: in the training processes (`sync.py`) or in an eval process of its own
(`async_eval.py`). The hook calls a placement at five moments, on every rank, and knows nothing else of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class SaveEvent:
    """One persistent save, as the hook sees it on one rank."""

    iteration: int
    final: bool  # the run's last save
    tokens: int | None  # training tokens consumed so far
    exiting: bool = False  # this rank caught the job's exit signal (--exit-signal-handler): the job is stopping


class Placement(Protocol):
    """What a placement does at a scheduled save, after a training log step, and at the end of training.

    Every method runs on every rank of the job, in the training loop, and never raises into training (but
    for KeyboardInterrupt and SystemExit): what fails is recorded in the ledger and logged.
    """

    name: str

    def at_save(self, event: SaveEvent, model: Any) -> None:
        """Right after Megatron saved `event.iteration` and the schedule selected it; `model`: Megatron's list
        of model chunks, as training holds them. Training is in train mode and must continue exactly as if
        nothing had happened."""
        ...

    def before_load(self, iterations: list[int], load: Callable[[int], None], model: Any) -> None:
        """Before a restarted job loads the checkpoint it resumes from: `iterations` are the scheduled saves
        before that one whose checkpoints are complete in the run's --save folder. Evaluates what each still
        lacks in the ledger (`resume`): the sync placement reads each into `model` with `load(iteration)`
        (Megatron's own loading, collective on every rank) and evaluates it there; the async placement has its
        eval process read them from disk. The checkpoint resumed from is loaded afterwards, over them."""
        ...

    def at_load(self, event: SaveEvent, model: Any) -> None:
        """Right after a job restarted from the checkpoint of `event.iteration` (a scheduled save) loaded it,
        before iteration 1: `model` holds that save's weights. Evaluates what that save still lacks in the
        ledger (`resume`)."""
        ...

    def at_log(self) -> None:
        """After each of Megatron's `training_log` calls (once per iteration)."""
        ...

    def at_end(self, exiting: bool) -> None:
        """After the run's last save, or the save of a job stopping on its exit signal (`exiting`)."""
        ...
