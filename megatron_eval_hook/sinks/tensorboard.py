"""TensorBoard sink: the same keys as W&B, written through Megatron's own SummaryWriter.

Megatron creates its writer on the last rank when `--tensorboard-dir` is set; the scores then
sit in the same event files as the training loss, with the training iteration as the step.
Without that writer the sink does nothing.
"""

from __future__ import annotations


class TensorBoardSink:
    """Logs flat `{"eval/<benchmark>/<metric>": value}` dicts at step = training iteration."""

    def log(self, iteration: int, values: dict[str, float]) -> None:
        from megatron.training.global_vars import get_tensorboard_writer

        writer = get_tensorboard_writer()
        if writer is None:
            return
        for key, value in values.items():
            writer.add_scalar(key, value, iteration)
        writer.flush()

    def close(self) -> None:
        """Megatron owns the writer and closes it."""
