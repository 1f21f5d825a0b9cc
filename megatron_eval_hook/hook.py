"""The hook: wraps Megatron's `save_checkpoint` and evaluates the saved weights right after.

Megatron has no callback API. Its training loop calls `save_checkpoint` through the name it
imported into `megatron.training.training`, and ADLR autoresume through the one in
`megatron.training.checkpointing`; `install_hook` wraps both, `load_checkpoint` and `training_log`. The wrappers fire
on every rank; the hook decides which saves the schedule selects and hands each to the placement
(`placement/__init__.py`): at a selected save, after each training log step, and at the end of
training (the run's last save, at --train-iters, after `train` returns when off the save grid, or at
--exit-interval; or a save made on the job's exit signal).

Sync placement (`placement/sync.py`): the last rank (the one Megatron gives its W&B run) runs HELM,
and every rank computes its answers on the weights as training shards them (tensor and pipeline
parallelism), the requests split across the data-parallel replicas; training waits.

Async placement (`placement/async_eval.py`): every rank copies its shards of the weights into host
memory and goes on; the scores that arrive are logged between iterations. The end of training lets
the pending evaluations finish; a job stopping on its exit signal or --exit-duration-in-mins records
them as not done.

Restarted jobs (`resume`): before Megatron loads the checkpoint a job resumes from, the earlier scheduled
saves of its --save folder that the ledger lacks results for are evaluated from their checkpoints, and so is
the one resumed from, after it is loaded: before iteration 1 under the sync placement, in the eval process
while training runs under the async one. So every scheduled save ends with one `ok` result per benchmark
without `megatron-eval backfill`, whatever stopped a job (a kill, preemption, a failure with a transient
cause; a benchmark that failed `resume.max_attempts` times is left alone)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from megatron_eval_hook.checkpoints import complete_iterations, is_last_save, tokens_seen, tracker_iteration
from megatron_eval_hook.config import (
    ConfigError,
    EvalHookConfig,
    load_config,
    resolve_ledger,
    resolve_output_dir,
    resolve_run_name,
)
from megatron_eval_hook.helm.benchmarks import resolve_benchmarks
from megatron_eval_hook.ledger import Ledger, LedgerUnusable
from megatron_eval_hook.log import log_to_stdout
from megatron_eval_hook.placement import Placement, SaveEvent
from megatron_eval_hook.placement.async_eval import AsyncPlacement
from megatron_eval_hook.placement.sync import SyncPlacement

logger = logging.getLogger("megatron_eval_hook")

PLACEMENTS: dict[str, type] = {"sync": SyncPlacement, "async": AsyncPlacement}

_ACTIVE: EvalHook | None = None  # the hook the installed wrappers call


def install_hook(args: Any, config: EvalHookConfig | None = None) -> EvalHook | None:
    """Load the config named by `args`, validate everything, and wrap Megatron's save path.

    Raises `ConfigError` (before training starts) for any bad value. Returns None when the
    config says `enabled: false`.
    """
    global _ACTIVE
    if _ACTIVE is not None and _ACTIVE.args is args:
        return _ACTIVE  # installed already for these arguments (patched script run through the launcher)
    if config is None:
        config = load_config(args.eval_hook_config, args.eval_hook_override or [])
    log_to_stdout("[eval-hook]")
    if not config.enabled:
        logger.info("eval hook: disabled by %s (enabled: false)", args.eval_hook_config)
        return None
    _ACTIVE = EvalHook(config, args)
    _wrap_save_checkpoint()
    _wrap_load_checkpoint()
    _wrap_training_log()
    return _ACTIVE


def _wrap_save_checkpoint() -> None:
    import megatron.training.checkpointing as checkpointing
    import megatron.training.training as training

    for module in (training, checkpointing):
        original = module.save_checkpoint
        if getattr(original, "__wrapped_by_eval_hook__", False):
            continue  # installed before (e.g. in-process restart): the wrapper calls the newest hook

        @functools.wraps(original)
        def save_checkpoint(iteration, model, *args, __original=original, **kwargs):
            result = __original(iteration, model, *args, **kwargs)
            if _ACTIVE is not None:
                _ACTIVE.after_save(iteration, model, non_persistent=bool(kwargs.get("non_persistent_ckpt", False)))
            return result

        save_checkpoint.__wrapped_by_eval_hook__ = True  # type: ignore[attr-defined]
        module.save_checkpoint = save_checkpoint


def _wrap_load_checkpoint() -> None:
    """After Megatron's training loop loaded a checkpoint (a restarted job), before iteration 1, the placement may
    evaluate what that save lacks."""
    import megatron.training.training as training

    original = training.load_checkpoint
    if getattr(original, "__wrapped_by_eval_hook__", False):
        return

    @functools.wraps(original)
    def load_checkpoint(model, *args, **kwargs):
        if _ACTIVE is not None:
            _ACTIVE.before_load(model, functools.partial(_load_weights_only, original, model, kwargs))
        result = original(model, *args, **kwargs)
        if _ACTIVE is not None:
            _ACTIVE.after_load(int(result[0]), model)
        return result

    load_checkpoint.__wrapped_by_eval_hook__ = True  # type: ignore[attr-defined]
    training.load_checkpoint = load_checkpoint


def _load_weights_only(load_checkpoint, model: Any, kwargs: dict[str, Any], iteration: int) -> None:
    """Megatron's `load_checkpoint` of the save of `iteration` into `model`: its weights only (no optimizer,
    scheduler or RNG state), every argument it reads put back as it was. Collective on every rank."""
    from megatron.training import get_args

    args = get_args()
    kept = {name: getattr(args, name, None) for name in ("ckpt_step", "no_load_optim", "no_load_rng")}
    args.ckpt_step, args.no_load_optim, args.no_load_rng = iteration, True, True
    try:
        load_checkpoint(model, None, None, **kwargs)
    finally:
        for name, value in kept.items():
            setattr(args, name, value)


def _wrap_training_log() -> None:
    """After each `training_log` (once per iteration, on every rank) the placement may log a score that arrived."""
    import megatron.training.training as training

    original = training.training_log
    if getattr(original, "__wrapped_by_eval_hook__", False):
        return

    @functools.wraps(original)
    def training_log(*args, **kwargs):
        result = original(*args, **kwargs)
        if _ACTIVE is not None:
            _ACTIVE.after_log()
        return result

    training_log.__wrapped_by_eval_hook__ = True  # type: ignore[attr-defined]
    training.training_log = training_log


class EvalHook:
    """Decides which saves to evaluate and runs the evaluation with training's state kept intact."""

    def __init__(self, config: EvalHookConfig, args: Any):
        self.config = config
        self.args = args
        if not args.save:
            raise ConfigError(
                "--eval-hook-config is set but --save is not: the hook evaluates saved checkpoints. "
                "Fix: pass --save DIR and --save-interval N."
            )
        self.run = resolve_run_name(config, args, args.save)
        self.output_dir = resolve_output_dir(config, args.save)
        self.ledger_path = resolve_ledger(config, args.save)
        self.rank = int(getattr(args, "rank", 0) or 0)
        self.world_size = int(getattr(args, "world_size", 1) or 1)
        self.evaluating_rank = self.world_size - 1  # Megatron's W&B rank
        self._check_schedule(args)
        max_sequence_length = self._context_window(args)
        try:
            benchmarks = resolve_benchmarks(config.benchmarks, config.presets)
        except ValueError as error:
            raise ConfigError(f"--eval-hook-config {args.eval_hook_config}: benchmarks: {error}") from error
        try:
            self.placement: Placement = PLACEMENTS[config.placement](
                config,
                benchmarks,
                run=self.run,
                output_dir=self.output_dir,
                ledger_path=self.ledger_path,
                max_sequence_length=max_sequence_length,
                megatron_args=args,
                config_path=args.eval_hook_config,
                rank=self.rank,
                world_size=self.world_size,
                evaluating_rank=self.evaluating_rank,
            )
        except LedgerUnusable as error:
            raise self._ledger_refused(error) from error
        if self.is_evaluating_rank:
            self._claim_run(args)
        self._evaluated: set[int] = set()
        self._loaded = False  # whether the checkpoint a restarted job resumes from was looked at
        self._reconciled = False  # whether the saves before that one were
        if self.is_evaluating_rank:
            logger.info(
                "installed: run %r, benchmarks %s, schedule %s, ledger %s",
                self.run,
                [b.name for b in benchmarks],
                config.schedule,
                self.ledger_path,
            )

    @property
    def is_evaluating_rank(self) -> bool:
        return self.rank == self.evaluating_rank

    def _check_schedule(self, args: Any) -> None:
        schedule, interval = self.config.schedule, args.save_interval
        last = args.train_iters
        if not interval or not last:
            return
        if schedule.start > last:
            raise ConfigError(
                f"schedule.start={schedule.start} is after the last iteration (--train-iters {last}): nothing would "
                "be evaluated. Fix: lower schedule.start."
            )
        grid = range(interval, (schedule.end or last) + 1, interval)
        if not any(schedule.selects(i) for i in grid) and not schedule.final:
            raise ConfigError(
                f"schedule (start={schedule.start}, every={schedule.every}, end={schedule.end}) selects none of the "
                f"saves at multiples of --save-interval {interval} up to iteration {last}. Fix: make schedule.every a "
                "multiple of --save-interval, or set schedule.final=true."
            )

    def _ledger_refused(self, error: LedgerUnusable) -> ConfigError:
        key = "ledger" if self.config.ledger else "ledger (null: <output_dir>/ledger.sqlite)"
        return ConfigError(f"--eval-hook-config {self.args.eval_hook_config}: {key}: {error}")

    def _claim_run(self, args: Any) -> None:
        """The run's name in the ledger stands for this --save folder; an earlier run of another folder holding
        it is refused, as its results and these would merge into one curve."""
        try:
            holder = Ledger(self.ledger_path).claim_run(self.run, args.save)
        except LedgerUnusable as error:
            raise self._ledger_refused(error) from error
        if holder is not None:
            source = (
                "run_name"
                if self.config.run_name
                else "--wandb-exp-name"
                if getattr(args, "wandb_exp_name", None)
                else "the --save folder's name"
            )
            raise ConfigError(
                f"--eval-hook-config {args.eval_hook_config}: the run name {self.run!r} (from {source}) already "
                f"names another run in the ledger {self.ledger_path}, the one saving into {holder}; this run saves "
                f"into {Path(args.save).resolve()}. Fix: give this run a name of its own "
                f"(--eval-hook-override run_name=NAME), or resume that run with --save {holder}."
            )

    def _context_window(self, args: Any) -> int:
        """The evaluation's context window: `engine.max_sequence_length`, else --seq-length. A model with learned
        positions has none beyond --max-position-embeddings: refused here rather than failing at every save."""
        window = self.config.engine.max_sequence_length or args.seq_length
        positions = getattr(args, "max_position_embeddings", None)
        learned = getattr(args, "position_embedding_type", "learned_absolute") == "learned_absolute"
        if learned and positions and window > positions:
            where = (
                f"engine.max_sequence_length={window}"
                if self.config.engine.max_sequence_length
                else f"--seq-length {window} (engine.max_sequence_length is null)"
            )
            raise ConfigError(
                f"--eval-hook-config {args.eval_hook_config}: {where} is longer than the model's learned position "
                f"embeddings (--max-position-embeddings {positions}). Fix: set engine.max_sequence_length to at "
                f"most {positions}."
            )
        return window

    def after_save(self, iteration: int, model: Any, non_persistent: bool = False) -> None:
        """Called on every rank after Megatron saved `iteration`. Never raises into training
        (but for KeyboardInterrupt/SystemExit)."""
        if non_persistent or getattr(self.args, "ckpt_convert_format", None):
            return  # not a training checkpoint: a non-persistent save, or a format-conversion job
        event = SaveEvent(
            iteration, is_last_save(self.args, iteration), tokens_seen(self.args), self._exiting_on_signal()
        )
        if iteration not in self._evaluated and self.config.schedule.selects(iteration, event.final):
            self._evaluated.add(iteration)
            self._guarded(self.placement.at_save, event, model)
        if event.final or event.exiting:
            self._guarded(self.placement.at_end, event.exiting)

    def before_load(self, model: Any, load: Any) -> None:
        """Called on every rank before Megatron loads the checkpoint a restarted job resumes from: the earlier
        scheduled saves of the run's folder that the ledger lacks results for are evaluated first (`resume`)."""
        if self._reconciled or not self.config.resume.evaluate_missing:
            return
        self._reconciled = True
        earlier = self._earlier_saves()
        if earlier:
            self._guarded(self.placement.before_load, earlier, load, model)

    def _earlier_saves(self) -> list[int]:
        """The complete, scheduled saves of --save before the one this job resumes from (none for a fresh start,
        --finetune, or a --load folder other than --save, whose saves are another run's)."""
        args = self.args
        if getattr(args, "finetune", False) or not getattr(args, "load", None):
            return []
        if Path(args.load).resolve() != Path(args.save).resolve():
            return []
        resumed = getattr(args, "ckpt_step", None) or tracker_iteration(args.load)
        if not resumed:
            return []
        schedule = self.config.schedule
        return [i for i in complete_iterations(args.save) if i < resumed and schedule.selects(i, is_last_save(args, i))]

    def after_load(self, iteration: int, model: Any) -> None:
        """Called on every rank after Megatron loaded the checkpoint of `iteration` to resume training from it
        (the first load of the job only; none for a fresh start or --finetune, which start at 0)."""
        if self._loaded or iteration <= 0 or not self.config.resume.evaluate_missing:
            return
        self._loaded = True
        final = is_last_save(self.args, iteration)
        if not self.config.schedule.selects(iteration, final):
            return
        self._evaluated.add(iteration)
        self._guarded(self.placement.at_load, SaveEvent(iteration, final, tokens_seen(self.args)), model)

    def after_log(self) -> None:
        """Called on every rank after each of Megatron's `training_log` calls."""
        self._guarded(self.placement.at_log)

    @staticmethod
    def _guarded(call, *args) -> None:
        try:
            call(*args)
        except Exception:  # an evaluation must never kill training
            logger.exception("eval hook: %s failed", call.__name__)

    def _exiting_on_signal(self) -> bool:
        """Whether Megatron's exit-signal handler (--exit-signal-handler) caught its signal here."""
        if not getattr(self.args, "exit_signal_handler", False):
            return False
        from megatron.training import global_vars

        handler = getattr(global_vars, "_GLOBAL_SIGNAL_HANDLER", None)
        return bool(getattr(handler, "_signal_received", False))
