"""Evaluate one checkpoint's weights with the HELM suite: ledger first, then the sinks.

Shared by the hook's sync placement (the live training model) and `megatron-eval backfill`
(a checkpoint loaded from disk). Each evaluated save gets one ledger row per benchmark, opened as
`running` before anything is evaluated and closed as `ok` with its metrics or `failed` with the
reason, even when the evaluation is interrupted (Ctrl-C). Only then do the scores go to the sinks.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

from megatron_eval_hook.compare import Comparison, adjusted, compare_values
from megatron_eval_hook.config import ConfigError, EvalHookConfig
from megatron_eval_hook.engine import Engine
from megatron_eval_hook.export import SnapshotExport
from megatron_eval_hook.helm.benchmarks import Benchmark
from megatron_eval_hook.helm.runner import BenchmarkError, HelmSuite
from megatron_eval_hook.ledger import Ledger, MetricValue
from megatron_eval_hook.sinks import Deliveries, is_logged, score_key
from megatron_eval_hook.uncertainty import of_runs

logger = logging.getLogger("megatron_eval_hook")


class Sink(Protocol):
    def log(self, iteration: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


# What an evaluation runs on: the bare GPTModel and the run's Megatron tokenizer.
ModelAndTokenizer = tuple[Any, Any]


def build_engine(gpt: Any, tokenizer: Any, config: EvalHookConfig, max_sequence_length: int) -> Engine:
    """The engine on `gpt` (a bare GPTModel, or this rank's part of one) for the run's Megatron tokenizer:
    every rank of a sharded evaluation builds its own with the same arguments. Puts `gpt` in eval mode
    (no dropout)."""
    from megatron_eval_hook.helm.client import MegatronTokenizer

    gpt.eval()
    return Engine(
        gpt,
        vocab_size=tokenizer.vocab_size,
        max_sequence_length=max_sequence_length,
        batch_size=config.engine.batch_size,
        end_of_text=getattr(tokenizer, "eod", None),
        decode=MegatronTokenizer(tokenizer).decode,
    )


class Evaluator:
    """Runs the HELM suite on a model's checkpoints and records each outcome."""

    def __init__(
        self,
        config: EvalHookConfig,
        benchmarks: list[Benchmark],
        *,
        run: str,
        output_dir: Path,
        ledger: Ledger,
        max_sequence_length: int,
        placement: str,
        sinks: list[Sink],
        where: str,
        megatron_args: Any,
    ):
        self.config = config
        self.run = run
        self.ledger = ledger
        self.placement = placement
        self.sinks = sinks
        self.deliveries = Deliveries(sinks, ledger, run, config.wandb.log_all_metrics)
        self.max_sequence_length = max_sequence_length
        self.model_key = re.sub(r"[^A-Za-z0-9_.-]", "_", run)
        self._open: dict[str, int] = {}  # benchmark -> ledger id of its attempt still running
        self._ids: list[int] = []  # ledger ids of the latest evaluation
        self._scores: dict[str, float] = {}  # W&B key -> value of the latest evaluation
        self._main: dict[str, float] = {}  # benchmark -> main score of the latest evaluation
        self._ok_ids: dict[str, tuple[int, str]] = {}  # benchmark -> (ledger id, main metric) of its ok attempt
        self._duration_s = 0.0
        self._exported: Path | None = None  # where the latest evaluation's weights were exported
        self._export_s = 0.0
        self.failed: list[str] = []  # benchmarks that failed in the latest evaluation
        # attempts whose failure the ledger could not record (e.g. a full disk): (ledger id, reason), retried
        # at the next evaluation
        self._unrecorded: list[tuple[int, str]] = []
        self.export = SnapshotExport.check(config.export_hf, megatron_args, where) if config.export_hf else None
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
            raise ConfigError(f"{where}: {error}") from error
        closed = ledger.close_interrupted(run)
        if closed:
            logger.info("ledger: %d evaluation(s) of run %r were interrupted earlier; marked failed", closed, run)

    @property
    def benchmark_names(self) -> list[str]:
        return [prepared.name for prepared in self.suite.benchmarks]

    def missing(self, iteration: int, max_attempts: int) -> list[str]:
        """The benchmarks without an `ok` result at `iteration` that failed there fewer than `max_attempts` times."""
        return self.ledger.lacking(self.run, iteration, self.benchmark_names, max_attempts)

    def evaluate(
        self,
        iteration: int,
        tokens: int | None,
        model: Callable[[], ModelAndTokenizer],
        only: Collection[str] | None = None,
        serve: Callable[[Engine], Any] | None = None,
    ) -> None:
        """Evaluate the weights saved at `iteration` on every benchmark (or those named in `only`).

        `model()` gives the GPTModel and tokenizer; it is called after the ledger rows are opened,
        so a model that cannot be produced (an unreadable checkpoint) is recorded as a failure too.
        `serve(engine)`, when given, returns what answers HELM's requests in the engine's place (the
        sharded placement's engine, computed by every rank of the job)."""
        from megatron_eval_hook.helm.client import InProcessModel, MegatronTokenizer, register_model

        self._record_unrecorded()
        chosen = [p for p in self.suite.benchmarks if only is None or p.name in only]
        self._scores, self._main, self._ok_ids, self._duration_s, self.failed = {}, {}, {}, 0.0, []
        self._exported, self._export_s = None, 0.0
        self._open = {
            prepared.name: self.ledger.begin(
                self.run,
                iteration,
                prepared.name,
                placement=self.placement,
                tokens=tokens,
                main_metric=prepared.main_metric,
                main_split=prepared.main_split,
            )
            for prepared in chosen
        }
        self._ids = list(self._open.values())
        try:
            gpt, tokenizer = model()
            if self.export is not None:
                self._export(gpt, tokenizer, iteration)
            engine = build_engine(gpt, tokenizer, self.config, self.max_sequence_length)
            in_process = InProcessModel(engine if serve is None else serve(engine), MegatronTokenizer(tokenizer))
            register_model(self.model_key, in_process)
            try:
                for prepared, outcome, seconds in self.suite.evaluate(in_process, iteration, only=only):
                    self._close(prepared, outcome, seconds)
            finally:
                engine.release()
        except BaseException as error:
            reason = (
                "interrupted: the evaluation was stopped (Ctrl-C) before this benchmark finished"
                if isinstance(error, KeyboardInterrupt)
                else f"{type(error).__name__}: {error}"
            )
            for name, evaluation_id in self._open.items():
                self._unrecorded.append((evaluation_id, reason))
                self.failed.append(name)
            self._open.clear()
            self._record_unrecorded()
            raise

    def _record_unrecorded(self) -> None:
        """Record as failed the attempts whose failure the ledger could not take; those it still cannot take are
        kept for the next evaluation, and said loudly."""
        waiting, self._unrecorded = self._unrecorded, []
        for evaluation_id, reason in waiting:
            try:
                self.ledger.finish_failed(evaluation_id, reason, 0.0)
            except Exception as error:
                self._unrecorded.append((evaluation_id, reason))
                logger.error("the ledger cannot record that evaluation %d failed (%s: %s); retried at the next save",
                             evaluation_id, type(error).__name__, error)  # fmt: skip

    def _export(self, gpt: Any, tokenizer: Any, iteration: int) -> None:
        """`export_hf`: a failure is logged and the benchmarks still run (their scores matter more)."""
        started = time.perf_counter()
        try:
            self._exported = self.export.write(gpt, tokenizer, iteration)
        except Exception as error:
            logger.warning("export_hf of iteration %d failed, the benchmarks run anyway: %s: %s",
                           iteration, type(error).__name__, error)  # fmt: skip
        self._export_s = time.perf_counter() - started

    def fail(self, iteration: int, tokens: int | None, reason: str, only: Collection[str]) -> None:
        """Record the benchmarks named in `only` as failed at `iteration` before they began, with `reason`."""
        for name in only:
            self.ledger.record_failed(self.run, iteration, name, reason, placement=self.placement, tokens=tokens)
        logger.warning("iteration %d: not evaluated: %s", iteration, reason)

    def skip(self, iteration: int, tokens: int | None, reason: str) -> None:
        """Record every benchmark of the save at `iteration` as skipped, with `reason`."""
        for prepared in self.suite.benchmarks:
            self.ledger.record_skipped(
                self.run, iteration, prepared.name, reason, placement=self.placement, tokens=tokens
            )
        logger.info("iteration %d: not evaluated: %s", iteration, reason)

    def _close(self, prepared: Any, outcome: list[MetricValue] | Exception, seconds: float) -> None:
        evaluation_id = self._open[prepared.name]  # open until the ledger took its end
        self._duration_s += seconds
        if isinstance(outcome, Exception):
            self.ledger.finish_failed(evaluation_id, f"{type(outcome).__name__}: {outcome}", seconds)
            del self._open[prepared.name]
            self.failed.append(prepared.name)
            logger.warning("benchmark %s failed: %s", prepared.name, outcome)
            return
        instances = self.suite.instances.get(prepared.name, [])
        self.ledger.finish_ok(evaluation_id, outcome, seconds, instances)
        del self._open[prepared.name]
        self._ok_ids[prepared.name] = (evaluation_id, prepared.main_metric)
        interval = of_runs([[value for _, value, *_ in run] for run in instances])
        for metric in outcome:
            is_main = (metric.metric, metric.split) == (prepared.main_metric, prepared.main_split)
            if is_main:
                self._main[prepared.name] = metric.value
                if interval is not None:
                    self._scores[score_key(prepared.name, metric.metric) + "_stderr"] = interval.stderr
            logged = is_logged(metric.metric, metric.split, prepared.main_metric, prepared.main_split,
                               self.config.wandb.log_all_metrics)  # fmt: skip
            if logged:
                self._scores[score_key(prepared.name, metric.metric)] = metric.value

    def publish(self, iteration: int, blocked_s: float | None = None) -> None:
        """Log the readable line and send the scores of the latest evaluation to the sinks.

        `blocked_s`: how long training waited for this evaluation (None when it did not wait)."""
        if blocked_s is not None:
            try:
                self.ledger.set_blocked(self._ids, blocked_s)
            except Exception as error:  # the scores still go to the sinks
                logger.error("the ledger cannot record the blocked time of iteration %d: %s: %s",
                             iteration, type(error).__name__, error)  # fmt: skip
        scores = ", ".join(f"{name} {value:.3f}" for name, value in self._main.items())
        regressions = self._regressions(iteration)
        if regressions:
            scores += "; REGRESSION " + ", ".join(
                f"{c.benchmark} {c.difference:+.3f} against iteration {against} (95% [{c.ci_low:+.3f}, "
                f"{c.ci_high:+.3f}], p_holm {c.p_holm:.2g})"
                for against, c in regressions
            )
        timing = f"evaluated in {self._duration_s:.1f} s"
        if blocked_s is not None:
            timing += f", training blocked {blocked_s:.1f} s"
        if self._exported is not None:
            timing += f", weights in {self._exported} ({self._export_s:.1f} s)"
        logger.info("iteration %d: %s (%s)", iteration, scores or "no scores", timing)
        values = {**self._scores, "eval/duration_s": self._duration_s}
        values.update({f"eval/{c.benchmark}/regression": c.difference for _, c in regressions})
        if blocked_s is not None:
            values["eval/blocked_s"] = blocked_s
        self.deliveries.send(iteration, values)

    def _regressions(self, iteration: int) -> list[tuple[int, Comparison]]:
        """The benchmarks of the latest evaluation whose score dropped beyond noise against an earlier save of the
        run (`alerts.*`: the best one or the previous one), paired on the same instances, Holm-adjusted over the
        benchmarks compared; each recorded in the ledger. Never raises: a failure here is logged."""
        alerts = self.config.alerts
        if not alerts.enabled or not self._ok_ids:
            return []
        try:
            against_of: dict[str, int] = {}  # benchmark -> the earlier iteration it is compared with
            compared: list[Comparison] = []
            for name, (evaluation_id, metric) in self._ok_ids.items():
                earlier = self.ledger.earlier_ok(self.run, name, iteration)
                if not earlier:
                    continue
                pick = (lambda e: (e[2], e[0])) if alerts.against == "best" else (lambda e: e[0])
                against, against_id, _ = max(earlier, key=pick)
                ours, theirs = self.ledger.instances_by_key(evaluation_id), self.ledger.instances_by_key(against_id)
                if not ours or not theirs or set(ours) != set(theirs):
                    continue  # not the same instances (older ledger rows, changed settings): no paired test
                compared.append(compare_values(name, metric, ours, theirs, f"iterations {iteration} and {against}"))
                against_of[name] = against
            found = [
                (against_of[c.benchmark], c)
                for c in adjusted(compared)
                if c.difference < 0 and c.p_holm < alerts.alpha and -c.difference >= alerts.min_drop
            ]
            for against, comparison in found:
                self.ledger.record_alert(self.run, iteration, against, comparison)
            return found
        except Exception:
            logger.exception("iteration %d: the regression check failed", iteration)
            return []

    def close(self) -> None:
        self.deliveries.flush()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                logger.exception("%s failed to close", type(sink).__name__)
