"""TensorBoard sink: the same keys as W&B, at step = training iteration.

In training it writes through Megatron's own SummaryWriter, created on the last rank when
`--tensorboard-dir` is set, so the scores sit in the same event files as the training loss;
without that writer the sink does nothing. Backfill hands it a writer of its own on the run's
TensorBoard folder.
"""

from __future__ import annotations

from typing import Any


class TensorBoardSink:
    """Logs flat `{"eval/<benchmark>/<metric>": value}` dicts at step = training iteration.

    `writer`: a SummaryWriter of the sink's own (closed with the sink); None for Megatron's."""

    name = "tensorboard"  # in the ledger's deliveries

    def __init__(self, writer: Any = None):
        self._writer = writer

    def log(self, iteration: int, values: dict[str, float]) -> None:
        writer = self._writer
        if writer is None:
            from megatron.training.global_vars import get_tensorboard_writer

            writer = get_tensorboard_writer()
        if writer is None:
            return
        for key, value in values.items():
            writer.add_scalar(key, value, iteration)
        writer.flush()

    def close(self) -> None:
        """Closes the sink's own writer; Megatron owns and closes its writer."""
        if self._writer is not None:
            self._writer.close()
