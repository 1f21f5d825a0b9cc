"""Sync placement: evaluate in the training process, right after the save; training waits.

The evaluating rank runs an `Evaluator` on the live model (ledger first, then the sinks: W&B and
TensorBoard through Megatron's own run and writer); the other ranks only wait.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_eval_hook.config import EvalHookConfig
from megatron_eval_hook.evaluator import Evaluator
from megatron_eval_hook.helm.benchmarks import Benchmark
from megatron_eval_hook.ledger import Ledger
from megatron_eval_hook.sinks import training_sinks


def unwrap_chunks(model: Any) -> list[Any]:
    """The bare `GPTModel`s inside Megatron's list of (DDP / Float16Module wrapped) model chunks."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(model if isinstance(model, list) else [model])


def unwrap_gpt_model(model: Any) -> Any:
    """The bare `GPTModel` of a model that is not split into pipeline chunks."""
    return unwrap_chunks(model)[0]


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
        self.evaluator: Evaluator | None = None
        if ledger is None:
            return  # not the evaluating rank: it only waits
        self.evaluator = Evaluator(
            config,
            benchmarks,
            run=run,
            output_dir=output_dir,
            ledger=ledger,
            max_sequence_length=max_sequence_length,
            placement=self.name,
            sinks=training_sinks(config, run=run, output_dir=output_dir, megatron_args=megatron_args),
            where=f"--eval-hook-config {config_path}",
            megatron_args=megatron_args,
        )

    def evaluate(self, event: Any, model: Any) -> None:
        """Evaluate the weights of `model` (Megatron's model chunks) saved at `event.iteration`."""
        from megatron.training import get_tokenizer

        assert self.evaluator is not None
        self.evaluator.evaluate(event.iteration, event.tokens, lambda: (unwrap_gpt_model(model), get_tokenizer()))

    def skip(self, event: Any, reason: str) -> None:
        """Record every benchmark of the save at `event.iteration` as skipped, with `reason`."""
        assert self.evaluator is not None
        self.evaluator.skip(event.iteration, event.tokens, reason)

    def publish(self, event: Any, blocked_s: float) -> None:
        """Record the time training was blocked; log the readable line and the W&B row."""
        if self.evaluator is not None:
            self.evaluator.publish(event.iteration, blocked_s=blocked_s)
