"""Where the scores go besides the ledger: W&B and TensorBoard, through the training run's own."""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any

from megatron_eval_hook.config import EvalHookConfig
from megatron_eval_hook.helm.choices import EARLY_SIGNAL_METRICS

logger = logging.getLogger("megatron_eval_hook")


def training_sinks(config: EvalHookConfig, *, run: str, output_dir: Path, megatron_args: Any) -> list[Any]:
    """The sinks of a training process: Megatron's W&B run and TensorBoard writer, as configured."""
    from megatron_eval_hook.sinks.tensorboard import TensorBoardSink
    from megatron_eval_hook.sinks.wandb import WandbSink, run_id_file

    sinks: list[Any] = []
    if config.wandb.enabled:
        sinks.append(
            WandbSink(
                config.wandb,
                run_name=run,
                default_dir=output_dir,
                default_project=getattr(megatron_args, "wandb_project", None),
                run_id_file=run_id_file(output_dir),
            )
        )
    if config.tensorboard.enabled:
        sinks.append(TensorBoardSink())
    return sinks


def score_key(benchmark: str, metric: str) -> str:
    """A score's key in the sinks, e.g. eval/boolq/quasi_exact_match."""
    return f"eval/{benchmark}/{metric}"


def is_logged(metric: str, split: str, main_metric: str, main_split: str, log_all_metrics: bool) -> bool:
    """Whether a benchmark's metric goes to the sinks: its main metric and early-signal scores (`choices.py`), or
    with `log_all_metrics` every metric of its main split."""
    if (metric, split) == (main_metric, main_split):
        return True
    return split == main_split and (log_all_metrics or metric in EARLY_SIGNAL_METRICS)


def benchmarks_in(values: dict[str, float]) -> set[str]:
    """The benchmarks whose scores `values` hold (`score_key`s; eval/duration_s and the like are not scores)."""
    return {key.split("/")[1] for key in values if key.startswith("eval/") and key.count("/") >= 2}


class Deliveries:
    """The scores' way to the sinks, which stay copies of the ledger.

    The ledger records which sink (by its `name`: wandb, tensorboard) has received the scores of which evaluation.
    What a sink has not received waits here and is logged again later: scores its `log` failed on (W&B
    unreachable, a full disk under TensorBoard), and, when this process starts, the scores an earlier process of
    the run recorded in the ledger but never logged (it was killed first). Late scores still land at their own
    iteration (the W&B sink plots against eval/iteration). While training runs they go at most one row per
    training step (`deliver`, after each of Megatron's log steps: W&B drops a row whose step is behind the last
    one), the rest at the end (`flush`). Sinks without a `name` (the eval process's pipe to the training process)
    are sent to and not tracked.

    A sink that writes a row later than its `log` returns (W&B closes a row when a later step comes; it has
    `committed(step)`) counts as having received it once it says the row is written, checked at each training
    step; at the end of training (`flush`) as soon as it was logged, since no later step comes (W&B writes the
    open row when the run finishes)."""

    def __init__(self, sinks: list[Any], ledger: Any, run: str, log_all_metrics: bool):
        self.sinks, self.ledger, self.run = sinks, ledger, run
        self._pending: deque[tuple[int, dict[str, float], list[Any]]] = deque()
        self._unwritten: list[tuple[Any, int, set[str], int]] = []  # (sink, iteration, benchmarks, its step)
        earlier = ledger.last_evaluation_id()  # what this process evaluates from now on is sent as it comes
        for sink in self._tracked(sinks):
            rows: dict[int, dict[str, float]] = {}
            for r in ledger.undelivered(run, sink.name, earlier):
                if is_logged(r["metric"], r["split"], r["main_metric"], r["main_split"], log_all_metrics):
                    rows.setdefault(r["iteration"], {})[score_key(r["benchmark"], r["metric"])] = r["value"]
            for iteration, values in rows.items():
                self._pending.append((iteration, values, [sink]))
        if self._pending:
            logger.info("%d row(s) of scores recorded in the ledger never reached a sink; logging them again",
                        len(self._pending))  # fmt: skip

    @staticmethod
    def _tracked(sinks: list[Any]) -> list[Any]:
        return [sink for sink in sinks if getattr(sink, "name", None)]

    @property
    def pending(self) -> int:
        return len(self._pending)

    def send(self, iteration: int, values: dict[str, float]) -> None:
        """Log the scores of the evaluation of `iteration` to every sink now; keep them for a sink that fails."""
        self._settle()
        failed = [sink for sink in self.sinks if not self._log(sink, iteration, values)]
        if failed:
            self._pending.append((iteration, values, failed))

    def deliver(self, at_most: int = 1) -> None:
        """Log up to `at_most` waiting rows; stop at the first that still fails (its sink is down)."""
        self._settle()
        for _ in range(min(at_most, len(self._pending))):
            iteration, values, sinks = self._pending.popleft()
            failed = [sink for sink in sinks if not self._log(sink, iteration, values)]
            if failed:
                self._pending.appendleft((iteration, values, failed))
                return

    def flush(self) -> None:
        """Log every waiting row (training is over: no step to keep pace with)."""
        self.deliver(len(self._pending))
        self._settle(final=True)

    def _settle(self, final: bool = False) -> None:
        """Record as received the rows their sink has written by now (all of them when `final`)."""
        waiting, self._unwritten = self._unwritten, []
        for sink, iteration, benchmarks, step in waiting:
            try:
                written = final or sink.committed(step)
            except Exception:  # it cannot say (e.g. a W&B run in shared mode): counted as received when logged
                written = True
            if written:
                self._mark(sink, iteration, benchmarks)
            else:
                self._unwritten.append((sink, iteration, benchmarks, step))

    def _log(self, sink: Any, iteration: int, values: dict[str, float]) -> bool:
        try:
            sink.log(iteration, values)
        except Exception:  # the ledger holds the scores: they wait here for the sink
            logger.exception("%s failed at iteration %d; its scores are logged again later", type(sink).__name__,
                             iteration)  # fmt: skip
            return False
        if not getattr(sink, "name", None):
            return True
        if hasattr(sink, "committed") and sink.last_step is not None:
            self._unwritten.append((sink, iteration, benchmarks_in(values), sink.last_step))
        else:
            self._mark(sink, iteration, benchmarks_in(values))
        return True

    def _mark(self, sink: Any, iteration: int, benchmarks: set[str]) -> None:
        try:
            self.ledger.mark_delivered(self.run, iteration, benchmarks, sink.name)
        except Exception as error:  # logged, not recorded: at worst logged once more by a later process
            logger.error("the ledger cannot record what %s received: %s: %s", sink.name, type(error).__name__,
                         error)  # fmt: skip
