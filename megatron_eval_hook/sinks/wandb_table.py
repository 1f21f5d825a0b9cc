"""W&B Tables for the ledger's views (baselines, leaderboard), each in a W&B run of its own.

These runs are made by one-shot commands, not by training: the run has a fixed id per project
and name, and the table is its summary value, so logging again resumes the same run and
replaces the table instead of adding a run (or a history step) beside the old one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def stable_run_id(project: str, name: str) -> str:
    """The same W&B run id every time for `name` in `project`."""
    return f"{name}-{hashlib.sha1(f'{project}/{name}'.encode()).hexdigest()[:10]}"


def log_table(
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    project: str,
    name: str,
    job_type: str,
    entity: str | None = None,
    directory: str | None = None,
    summary: Mapping[str, Any] | None = None,
) -> str:
    """Log `rows` as the W&B Table `key` in the run `name` of `project`; return the run's local folder.

    The W&B mode comes from the environment (`WANDB_MODE=offline` writes only local files).
    """
    import wandb

    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project,
        entity=entity,
        name=name,
        id=stable_run_id(project, name),
        resume="allow",
        job_type=job_type,
        dir=directory,
        reinit="create_new",
    )
    try:
        table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        run.summary.update({key: table, **(summary or {})})
        folder = str(Path(run.settings.sync_dir))
    finally:
        run.finish()
    if wandb.run is None:
        wandb.teardown()  # flushes the run file before the command returns
    return folder
