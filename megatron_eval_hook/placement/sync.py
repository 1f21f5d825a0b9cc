"""Sync placement: evaluate in the training process, right after the save; training waits.

Each scheduled save gets one ledger row per benchmark, opened as `running` before anything
is evaluated and closed as `ok` with its metrics or `failed` with the reason. Only then do the
scores go to the sinks.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from megatron_eval_hook.config import ConfigError, EvalHookConfig
from megatron_eval_hook.engine import Engine
from megatron_eval_hook.helm.benchmarks import Benchmark
from megatron_eval_hook.helm.runner import BenchmarkError, HelmSuite
from megatron_eval_hook.ledger import Ledger, MetricValue
from megatron_eval_hook.sinks.tensorboard import TensorBoardSink
from megatron_eval_hook.sinks.wandb import WandbSink

logger = logging.getLogger("megatron_eval_hook")


def unwrap_gpt_model(model: Any) -> Any:
    """The bare `GPTModel` inside Megatron's list of (DDP / Float16Module wrapped) model chunks."""
    from megatron.core.utils import unwrap_model

    chunks = model if isinstance(model, list) else [model]
    return unwrap_model(chunks)[0]


class SyncPlacement:
    """Runs the HELM suite on the evaluating rank and records the outcome."""

    name = "sync"

    def __init__(
        self,
        config: EvalHookConfig,
        benchmarks: list[Benchmark],
        *,
        run: str,
        output_dir: Path,
        ledger: Ledger | None,
        max_sequence_length: int,
        megatron_args: Any,
        config_path: str,
    ):
        self.config = config
        self.run = run
        self.ledger = ledger
        self.max_sequence_length = max_sequence_length
        self.model_key = re.sub(r"[^A-Za-z0-9_.-]", "_", run)
        self.suite: HelmSuite | None = None
        self.sinks: list[WandbSink | TensorBoardSink] = []
        self._open: dict[str, int] = {}  # benchmark -> ledger id of its attempt still running
        self._ids: list[int] = []  # ledger ids of the latest evaluation
        self._scores: dict[str, float] = {}  # W&B key -> value of the latest evaluation
        self._main: dict[str, float] = {}  # benchmark -> main score of the latest evaluation
        self._duration_s = 0.0
        if ledger is None:
            return  # not the evaluating rank: it only waits
        try:
            self.suite = HelmSuite(
                benchmarks,
                model_key=self.model_key,
                data_dir=config.data_dir,
                output_dir=output_dir,
                max_sequence_length=max_sequence_length,
                max_eval_instances=config.max_eval_instances,
                num_train_trials=config.num_train_trials,
            )
        except BenchmarkError as error:
            raise ConfigError(f"--eval-hook-config {config_path}: {error}") from error
        closed = ledger.close_interrupted(run)
        if closed:
            logger.info("ledger: %d evaluation(s) of run %r were interrupted earlier; marked failed", closed, run)
        if config.wandb.enabled:
            self.sinks.append(
                WandbSink(
                    config.wandb,
                    run_name=run,
                    default_dir=output_dir,
                    default_project=getattr(megatron_args, "wandb_project", None),
                )
            )
        if config.tensorboard.enabled:
            self.sinks.append(TensorBoardSink())

    def evaluate(self, event: Any, model: Any) -> None:
        """Evaluate the weights of `model` (Megatron's model chunks) saved at `event.iteration`."""
        from megatron.training import get_tokenizer

        from megatron_eval_hook.helm.client import InProcessModel, MegatronTokenizer, register_model

        assert self.suite is not None and self.ledger is not None
        self._scores, self._main, self._duration_s = {}, {}, 0.0
        self._open = {
            prepared.name: self.ledger.begin(
                self.run,
                event.iteration,
                prepared.name,
                placement=self.name,
                tokens=event.tokens,
                main_metric=prepared.main_metric,
                main_split=prepared.main_split,
            )
            for prepared in self.suite.benchmarks
        }
        self._ids = list(self._open.values())
        try:
            gpt = unwrap_gpt_model(model)
            gpt.eval()
            tokenizer = get_tokenizer()
            engine = Engine(
                gpt,
                vocab_size=tokenizer.vocab_size,
                max_sequence_length=self.max_sequence_length,
                batch_size=self.config.engine.batch_size,
                end_of_text=getattr(tokenizer, "eod", None),
            )
            in_process = InProcessModel(engine, MegatronTokenizer(tokenizer))
            register_model(self.model_key, in_process)
            for prepared, outcome, seconds in self.suite.evaluate(in_process, event.iteration):
                self._close(prepared, outcome, seconds)
        except Exception as error:
            for evaluation_id in self._open.values():
                self.ledger.finish_failed(evaluation_id, f"{type(error).__name__}: {error}", 0.0)
            self._open.clear()
            raise

    def skip(self, event: Any, reason: str) -> None:
        """Record every benchmark of the save at `event.iteration` as skipped, with `reason`."""
        assert self.suite is not None and self.ledger is not None
        for prepared in self.suite.benchmarks:
            self.ledger.record_skipped(
                self.run, event.iteration, prepared.name, reason, placement=self.name, tokens=event.tokens
            )
        logger.info("iteration %d: not evaluated: %s", event.iteration, reason)

    def _close(self, prepared: Any, outcome: list[MetricValue] | Exception, seconds: float) -> None:
        assert self.ledger is not None
        evaluation_id = self._open.pop(prepared.name)
        self._duration_s += seconds
        if isinstance(outcome, Exception):
            self.ledger.finish_failed(evaluation_id, f"{type(outcome).__name__}: {outcome}", seconds)
            logger.warning("benchmark %s failed: %s", prepared.name, outcome)
            return
        self.ledger.finish_ok(evaluation_id, outcome, seconds)
        for metric in outcome:
            is_main = (metric.metric, metric.split) == (prepared.main_metric, prepared.main_split)
            if is_main:
                self._main[prepared.name] = metric.value
            if is_main or (self.config.wandb.log_all_metrics and metric.split == prepared.main_split):
                self._scores[f"eval/{prepared.name}/{metric.metric}"] = metric.value

    def publish(self, event: Any, blocked_s: float) -> None:
        """Record the time training was blocked; log the readable line and the W&B row."""
        if self.ledger is None:
            return
        self.ledger.set_blocked(self._ids, blocked_s)
        scores = ", ".join(f"{name} {value:.3f}" for name, value in self._main.items())
        logger.info(
            "iteration %d: %s (evaluated in %.1f s, training blocked %.1f s)",
            event.iteration,
            scores or "no scores",
            self._duration_s,
            blocked_s,
        )
        values = {**self._scores, "eval/duration_s": self._duration_s, "eval/blocked_s": blocked_s}
        for sink in self.sinks:
            try:
                sink.log(event.iteration, values)
            except Exception:  # a sink failure loses nothing: the ledger already holds the scores
                logger.exception("%s failed at iteration %d", type(sink).__name__, event.iteration)
