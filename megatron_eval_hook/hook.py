"""The hook: wraps Megatron's `save_checkpoint` and evaluates the saved weights right after.

Megatron has no callback API. Its training loop calls `save_checkpoint` through the name it
imported into `megatron.training.training`, and ADLR autoresume through the one in
`megatron.training.checkpointing`; `install_hook` wraps both. The wrapper fires on every rank
after each save and asks the hook whether this save is to be evaluated.

Sync placement: the last rank (the one Megatron gives its W&B run) runs HELM, and every rank computes
its answers on the weights as training shards them (tensor and pipeline parallelism), the requests split
across the data-parallel replicas (`placement/sync.py`). The ranks talk over a gloo group of the hook's
own with a long timeout, so no training collective can time out.

Async placement: every rank copies its shards of the weights into host memory and goes on
(`placement/async_eval.py`). The hook also wraps `training_log`, to log the scores that arrive
between iterations. The run's last save (at --train-iters, after `train` returns when off the
save grid, or at --exit-interval) lets the pending evaluations finish; a job stopping on its exit
signal or --exit-duration-in-mins records them as not done (`megatron-eval backfill` evaluates
them later).
"""

from __future__ import annotations

import functools
import logging
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_eval_hook.checkpoints import is_last_save, tokens_seen
from megatron_eval_hook.config import (
    ConfigError,
    EvalHookConfig,
    load_config,
    resolve_ledger,
    resolve_output_dir,
    resolve_run_name,
)
from megatron_eval_hook.helm.benchmarks import resolve_benchmarks
from megatron_eval_hook.ledger import Ledger
from megatron_eval_hook.placement.async_eval import AsyncPlacement
from megatron_eval_hook.placement.sync import SyncPlacement, sequence_parallel_off

logger = logging.getLogger("megatron_eval_hook")

_ACTIVE: EvalHook | None = None  # the hook the installed wrappers call


@dataclass(frozen=True)
class SaveEvent:
    """One persistent save, as the hook sees it."""

    iteration: int
    final: bool  # the run's last save
    tokens: int | None  # training tokens consumed so far


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
    _setup_logging()
    if not config.enabled:
        logger.info("eval hook: disabled by %s (enabled: false)", args.eval_hook_config)
        return None
    _ACTIVE = EvalHook(config, args)
    _wrap_save_checkpoint()
    if isinstance(_ACTIVE.placement, AsyncPlacement):
        _wrap_training_log()
    return _ACTIVE


def _setup_logging() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[eval-hook] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


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


def _wrap_training_log() -> None:
    """After each `training_log` (once per iteration, on every rank) the hook logs a score that arrived."""
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
        try:
            benchmarks = resolve_benchmarks(config.benchmarks, config.presets)
        except ValueError as error:
            raise ConfigError(f"--eval-hook-config {args.eval_hook_config}: benchmarks: {error}") from error
        common = dict(
            run=self.run,
            output_dir=self.output_dir,
            max_sequence_length=config.engine.max_sequence_length or args.seq_length,
            megatron_args=args,
            config_path=args.eval_hook_config,
        )
        if config.placement == "async":
            self.placement = AsyncPlacement(
                config,
                benchmarks,
                ledger_path=self.ledger_path,
                rank=self.rank,
                world_size=self.world_size,
                evaluating_rank=self.evaluating_rank,
                **common,
            )
        else:
            self._check_parallelism(args)
            ledger = Ledger(self.ledger_path) if self.is_evaluating_rank else None
            self.placement = SyncPlacement(config, benchmarks, ledger=ledger, **common)
        self._evaluated: set[int] = set()
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

    def _check_parallelism(self, args: Any) -> None:
        """The layouts the sync placement cannot evaluate on yet, refused before the first iteration."""
        refused = {
            "--context-parallel-size": (getattr(args, "context_parallel_size", 1) or 1) > 1,
            "--virtual-pipeline-model-parallel-size (interleaved pipeline)": getattr(
                args, "virtual_pipeline_model_parallel_size", None
            )
            is not None,
            "--num-experts (mixture of experts)": bool(getattr(args, "num_experts", None)),
            "--expert-model-parallel-size": (getattr(args, "expert_model_parallel_size", 1) or 1) > 1,
        }
        sharded = (getattr(args, "tensor_model_parallel_size", 1) or 1) * (
            getattr(args, "pipeline_model_parallel_size", 1) or 1
        ) > 1
        refused["export_hf with --tensor/--pipeline-model-parallel-size > 1"] = sharded and bool(self.config.export_hf)
        flags = [flag for flag, bad in refused.items() if bad]
        if flags:
            raise ConfigError(
                f"the sync placement does not evaluate this layout yet: {', '.join(flags)}. Fix: placement=async "
                "(its eval process assembles the whole model on a spare device), or evaluate the saved "
                "checkpoints afterwards with `megatron-eval backfill`."
            )

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

    def after_save(self, iteration: int, model: Any, non_persistent: bool = False) -> None:
        """Called on every rank after Megatron saved `iteration`. Never raises into training
        (but for KeyboardInterrupt/SystemExit)."""
        if non_persistent or getattr(self.args, "ckpt_convert_format", None):
            return  # not a training checkpoint: a non-persistent save, or a format-conversion job
        event = SaveEvent(iteration, is_last_save(self.args, iteration), tokens_seen(self.args))
        if iteration in self._evaluated or not self.config.schedule.selects(iteration, event.final):
            return
        self._evaluated.add(iteration)
        if isinstance(self.placement, AsyncPlacement):
            self._snapshot(event, model)
            return
        started = time.perf_counter()
        evaluated = False
        try:
            # A preempted job saves and must stop within its grace period: do not spend it here. The
            # evaluating rank decides; every rank learns it.
            reason = self.placement.agree_on_skip(
                "the job received its exit signal (e.g. preemption) and is stopping; "
                "evaluating now could outlast the grace period"
                if self.is_evaluating_rank and self._exiting_on_signal()
                else None
            )
            if reason is not None:
                if self.is_evaluating_rank:
                    self.placement.skip(event, reason)
            else:
                evaluated = self.is_evaluating_rank
                with preserved_training_state(model), sequence_parallel_off(model):
                    self.placement.evaluate(event, model)
        except Exception:  # an evaluation must never kill training; the placement recorded the failure
            logger.exception("evaluation at iteration %d failed", iteration)
        if evaluated:
            self.placement.publish(event, blocked_s=time.perf_counter() - started)

    def _snapshot(self, event: SaveEvent, model: Any) -> None:
        """Async placement, every rank: hand this save's weights to the eval process. At the run's last
        save, let the pending evaluations finish; on the exit signal, record them as not done."""
        exiting = self._exiting_on_signal()
        try:
            self.placement.submit(event.iteration, event.tokens, model, exiting=exiting)
        except Exception:  # an evaluation must never kill training
            logger.exception("snapshot at iteration %d failed", event.iteration)
        if event.final or exiting:
            self.placement.finish(exiting=exiting)

    def after_log(self) -> None:
        """Async placement: log a score that arrived (main thread, between iterations)."""
        if isinstance(self.placement, AsyncPlacement):
            self.placement.publish(at_most=1)

    def _exiting_on_signal(self) -> bool:
        """Whether Megatron's exit-signal handler (--exit-signal-handler) caught its signal here."""
        if not getattr(self.args, "exit_signal_handler", False):
            return False
        from megatron.training import global_vars

        handler = getattr(global_vars, "_GLOBAL_SIGNAL_HANDLER", None)
        return bool(getattr(handler, "_signal_received", False))


@contextmanager
def preserved_training_state(model: Any):
    """Evaluate with the model in eval mode and every RNG untouched, then put training back
    exactly as it was: train mode, and the Python, NumPy, torch (CPU and CUDA) and Megatron
    model-parallel RNG states, so training continues bit-identically."""
    chunks = model if isinstance(model, list) else [model]
    modes = [chunk.training for chunk in chunks]
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = _cuda_rng_states()
    tracker_states = _megatron_rng_states()
    try:
        yield
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if tracker_states is not None:
            from megatron.core import tensor_parallel

            tensor_parallel.get_cuda_rng_tracker().set_states(tracker_states)


def _cuda_rng_states():
    if not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.get_rng_state_all()
    except (AssertionError, RuntimeError):  # torch built without CUDA behind CPU shims
        return None


def _megatron_rng_states():
    from megatron.core import tensor_parallel

    try:
        return tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # no tracker initialised (e.g. a model built outside Megatron's initialisation)
        return None
