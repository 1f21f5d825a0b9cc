"""Evaluate checkpoints already on disk, as the hook would have right after each save.

`Backfill` walks a Megatron save folder (`--save`), rebuilds the run's model on one device from
the arguments stored in its checkpoints (`loading.CheckpointModel`, any TP/PP layout), loads each
selected iteration's weights and evaluates them with the same `Evaluator` as the hook: the same
HELM suite, engine and client, the same ledger rows (placement `backfill`) and the same W&B and
TensorBoard keys, at the checkpoint's iteration.

- Only complete saves count: iterations up to the one in `latest_checkpointed_iteration.txt`,
  which Megatron writes once a save has completed (also with `--async-save`).
- Idempotent: an iteration whose every benchmark the ledger already holds as `ok` for the run is
  skipped; otherwise only the benchmarks not yet `ok` are evaluated.
- `follow` keeps polling for new saves until the tracker reaches `schedule.end`, or Ctrl-C. An
  evaluation cut short by Ctrl-C is closed in the ledger as `failed` (interrupted), so the next
  backfill evaluates it again; the benchmarks finished before are recorded and logged.
- W&B: a run of backfill's own (job type `backfill`), continued by later backfills of the same
  output folder (its id is kept in `<output_dir>/wandb_backfill_run_id`), never the training
  job's run, which may still be open. TensorBoard: the run's `--tensorboard-dir`, beside the loss.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from time import sleep
from typing import Any

from megatron_eval_hook.checkpoints import (
    CheckpointError,
    complete_iterations,
    is_last_save,
    iteration_folder,
    read_args,
    saved_iterations,
    tokens_seen,
    tracker_iteration,
)
from megatron_eval_hook.config import (
    ConfigError,
    EvalHookConfig,
    ScheduleConfig,
    resolve_ledger,
    resolve_output_dir,
    resolve_run_name,
)
from megatron_eval_hook.helm.benchmarks import resolve_benchmarks
from megatron_eval_hook.ledger import Ledger

logger = logging.getLogger("megatron_eval_hook")

PLACEMENT = "backfill"
WANDB_RUN_ID_FILE = "wandb_backfill_run_id"


class Backfill:
    """Evaluates the complete, scheduled, not yet evaluated checkpoints of the save folder `save_dir`."""

    def __init__(
        self,
        save_dir: Path,
        config: EvalHookConfig,
        *,
        schedule: ScheduleConfig,
        where: str,
        tensorboard_dir: str | None = None,
        tokenizer_paths: dict[str, str | None] | None = None,
    ):
        self.save_dir = save_dir
        self.config = config
        self.schedule = schedule
        self.where = where
        self.tensorboard_dir = tensorboard_dir
        self.tokenizer_paths = tokenizer_paths or {}
        try:
            self.benchmarks = resolve_benchmarks(config.benchmarks, config.presets)
        except ValueError as error:
            raise ConfigError(f"{where}: benchmarks: {error}") from error
        self.output_dir = resolve_output_dir(config, save_dir)
        self.ledger = Ledger(resolve_ledger(config, save_dir))
        self.run: str | None = None
        self.failures = 0  # benchmark evaluations that failed in this backfill
        self._evaluator: Any = None
        self._model: Any = None
        self._last_args: Any = None

    # -- which iterations

    def pending(self) -> list[int]:
        """Complete iterations the schedule selects that still lack an `ok` evaluation of some benchmark."""
        iterations = complete_iterations(self.save_dir)
        if not iterations:
            return []
        self._start(iterations[-1])
        done = self.ledger.ok_benchmarks(self.run)
        wanted = set(self._evaluator.benchmark_names)
        return [
            i
            for i in iterations
            if self.schedule.selects(i, is_last_save(self._last_args, i)) and not wanted <= done.get(i, set())
        ]

    def _start(self, latest: int) -> None:
        """Name the run and set up the evaluator, from the arguments of the latest complete checkpoint."""
        try:
            args = read_args(iteration_folder(self.save_dir, latest))
        except CheckpointError:
            if self._evaluator is None:
                raise
            return  # evaluating it records why; the arguments read before still tell the run's last save
        self._last_args = args
        if self._evaluator is not None:
            return
        from megatron_eval_hook.evaluator import Evaluator

        self.run = resolve_run_name(self.config, args, self.save_dir)
        self._evaluator = Evaluator(
            self.config,
            self.benchmarks,
            run=self.run,
            output_dir=self.output_dir,
            ledger=self.ledger,
            max_sequence_length=self.config.engine.max_sequence_length or args.seq_length,
            placement=PLACEMENT,
            sinks=self._sinks(args),
            where=self.where,
            megatron_args=args,
        )
        logger.info("run %r: benchmarks %s, ledger %s", self.run, self._evaluator.benchmark_names, self.ledger.path)

    def _sinks(self, args: Any) -> list[Any]:
        from megatron_eval_hook.sinks.tensorboard import TensorBoardSink
        from megatron_eval_hook.sinks.wandb import WandbSink

        sinks: list[Any] = []
        if self.config.wandb.enabled:
            sinks.append(
                WandbSink(
                    self.config.wandb,
                    run_name=self.run,
                    default_dir=self.output_dir,
                    default_project=getattr(args, "wandb_project", None) or None,
                    run_id_file=self.output_dir / WANDB_RUN_ID_FILE,
                    use_active_run=False,
                    job_type=PLACEMENT,
                )
            )
        folder = self.tensorboard_dir or getattr(args, "tensorboard_dir", None)
        if self.config.tensorboard.enabled and folder:
            if self.tensorboard_dir is None and not Path(folder).is_dir():
                logger.warning(
                    "TensorBoard: the run's --tensorboard-dir %s does not exist here; pass --tensorboard-dir to "
                    "write the scores beside the training loss",
                    folder,
                )
            else:
                from torch.utils.tensorboard import SummaryWriter

                sinks.append(TensorBoardSink(SummaryWriter(log_dir=folder)))
        return sinks

    # -- evaluating

    def run_pending(self) -> int:
        """Evaluate every pending iteration; return how many there were."""
        pending = self.pending()
        for iteration in pending:
            self.evaluate(iteration)
        return len(pending)

    def evaluate(self, iteration: int) -> None:
        """Evaluate the benchmarks not yet `ok` at `iteration`, record and publish them."""
        folder = iteration_folder(self.save_dir, iteration)
        only = set(self._evaluator.benchmark_names) - self.ledger.ok_benchmarks(self.run).get(iteration, set())
        try:
            args = read_args(folder)
        except CheckpointError as error:  # recorded as this iteration's failure
            self._attempt(iteration, None, functools.partial(_raise, error), only)
            return
        model = self._model_for(args, folder)  # a run-wide problem (tokenizer, architecture) stops the backfill

        def load() -> tuple[Any, Any]:
            model.load(folder)
            return model.gpt, model.tokenizer

        self._attempt(iteration, tokens_seen(args), load, only)

    def _attempt(self, iteration: int, tokens: int | None, load: Callable[[], Any], only: set[str]) -> None:
        try:
            self._evaluator.evaluate(iteration, tokens, load, only=only)
        except KeyboardInterrupt:
            if len(self._evaluator.failed) < len(only):  # some finished before the interrupt: log them too
                self._evaluator.publish(iteration)
            raise
        except Exception as error:
            print(f"megatron-eval backfill: iteration {iteration}: {error}", file=sys.stderr)
            return
        finally:
            self.failures += len(self._evaluator.failed)
        self._evaluator.publish(iteration)

    def _model_for(self, args: Any, folder: Path) -> Any:
        from megatron_eval_hook.loading import CheckpointModel, architecture_of

        if self._model is None or self._model.architecture != architecture_of(args):
            self._model = None  # free the previous model's memory first
            self._model = CheckpointModel(args, folder, **self.tokenizer_paths)
        return self._model

    # -- the two modes

    def run_once(self) -> None:
        """Evaluate what is pending now; CheckpointError when the folder holds no complete checkpoint."""
        if not complete_iterations(self.save_dir):
            raise CheckpointError(self._no_checkpoint())
        if self.run_pending() == 0:
            logger.info("nothing to evaluate: every selected iteration of run %r is in the ledger as ok", self.run)

    def follow(self, poll_s: float) -> None:
        """Evaluate new complete checkpoints as they appear, until the tracker reaches `schedule.end`."""
        waiting = False
        while True:
            if self.run_pending():
                waiting = False
            latest = tracker_iteration(self.save_dir)
            if self.schedule.end is not None and latest is not None and latest >= self.schedule.end:
                logger.info("reached schedule end %d (latest save %d): done", self.schedule.end, latest)
                return
            if not waiting:
                logger.info(
                    "waiting for new checkpoints in %s (latest complete: %s; polling every %g s, Ctrl-C stops)",
                    self.save_dir,
                    latest,
                    poll_s,
                )
                waiting = True
            sleep(poll_s)

    def _no_checkpoint(self) -> str:
        where = f"--checkpoints {self.save_dir}"
        started = saved_iterations(self.save_dir)
        if started:
            return (
                f"{where} holds iter_* folders {started} but no completed save (latest_checkpointed_iteration.txt "
                "is missing or names an earlier iteration): their saves did not finish. Fix: wait until Megatron "
                "finishes a save, or use --follow to evaluate saves as they complete."
            )
        return (
            f"{where} holds no checkpoint (no iter_* folders, no latest_checkpointed_iteration.txt). Fix: pass the "
            "--save folder of the training run, or use --follow to wait for its first save."
        )

    def close(self) -> None:
        if self._evaluator is not None:
            self._evaluator.close()


def _raise(error: BaseException) -> Any:
    raise error


def backfill_schedule(config: EvalHookConfig, start: int | None, end: int | None, every: int | None) -> ScheduleConfig:
    """The config's schedule with --start, --end and --every in place of its own where given."""
    schedule = ScheduleConfig(
        start=config.schedule.start if start is None else start,
        end=config.schedule.end if end is None else end,
        every=config.schedule.every if every is None else every,
        final=config.schedule.final,
    )
    if schedule.start < 0:
        raise ConfigError(f"--start {schedule.start} is not valid. Fix: use an iteration >= 0.")
    if schedule.every < 1:
        raise ConfigError(f"--every {schedule.every} is not valid. Fix: use 1 (every checkpoint) or more.")
    if schedule.end is not None and schedule.end < schedule.start:
        raise ConfigError(f"--end {schedule.end} is before --start {schedule.start}. Fix: use --end >= --start.")
    return schedule
