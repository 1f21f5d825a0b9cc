"""Weights & Biases sink: evaluation scores in the same run as Megatron's training loss.

Megatron opens its W&B run inside `pretrain()` on the last rank when `--wandb-project` is set;
the sink attaches to that run at its first log, and opens a run of its own only when there is
none. Scores carry the key `eval/iteration` and are plotted against it (`define_metric`), so a
result logged after training has moved on still lands at its own iteration.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from megatron_eval_hook.config import WandbConfig

logger = logging.getLogger(__name__)

STEP_KEY = "eval/iteration"


class WandbSink:
    """Logs flat `{"eval/<benchmark>/<metric>": value}` dicts against the training iteration."""

    def __init__(self, config: WandbConfig, *, run_name: str, default_dir: Path, default_project: str | None):
        self.config = config
        self.run_name = run_name
        self.dir = Path(config.dir) if config.dir else default_dir
        self.project = config.project or default_project or "megatron-eval"
        self._run: Any = None
        self._own_run = False

    def _attach(self) -> Any:
        import wandb

        if self._run is not None and (self._own_run or wandb.run is self._run):
            return self._run  # Megatron's run counts only while it is still the active one
        if wandb.run is not None:
            self._run, self._own_run = wandb.run, False
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                project=self.project,
                entity=self.config.entity,
                name=self.run_name,
                dir=str(self.dir),
                mode=self.config.mode,
                job_type="eval",
                reinit="create_new",
            )
            self._own_run = True
            atexit.register(self.close)  # Megatron tells plugins nothing when training ends
        self._run.define_metric(STEP_KEY)
        self._run.define_metric("eval/*", step_metric=STEP_KEY)
        logger.info("eval scores go to W&B run %s (%s)", self._run.name, "own" if self._own_run else "Megatron's")
        return self._run

    def log(self, iteration: int, values: dict[str, float]) -> None:
        run = self._attach()
        row = {STEP_KEY: iteration, **values}
        if run.step <= iteration:
            # Same row as the training loss of this iteration; W&B steps must not go back.
            run.log(row, step=iteration)
        else:
            run.log(row, commit=False)

    def close(self) -> None:
        if self._own_run and self._run is not None:
            self._run.finish()
        self._run = None
