"""Where the scores go besides the ledger: W&B and TensorBoard, through the training run's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_eval_hook.config import EvalHookConfig


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
