"""Weights & Biases sink: evaluation scores in the same run as Megatron's training loss.

Megatron opens its W&B run inside `parse_and_validate_args` on the last rank when `--wandb-project`
is set; the sink attaches to that run at its first log, and opens a run of its own only when there
is none. Scores carry the key `eval/iteration` and are plotted against it (`define_metric`), so a
result logged after training has moved on still lands at its own iteration.

Continuity across restarts: the id of the run the scores go to is kept beside the ledger
(`<output_dir>/wandb_run_id`). A job restarted from a checkpoint logs into that same run, its own
or Megatron's: `resume_megatron_run` makes Megatron's `wandb.init` resume it (set up by the hook's
argument provider, before Megatron initialises W&B).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from megatron_eval_hook.config import WandbConfig

logger = logging.getLogger(__name__)

STEP_KEY = "eval/iteration"
RUN_ID_FILE = "wandb_run_id"


def run_id_file(output_dir: str | Path) -> Path:
    """Where the id of the W&B run holding the scores of the run with this output folder is kept."""
    return Path(output_dir) / RUN_ID_FILE


def read_run_id(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return path.read_text().strip() or None


def write_run_id(path: Path | None, run_id: str) -> None:
    if path is None or read_run_id(path) == run_id:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(run_id + "\n")
    partial.replace(path)


class WandbSink:
    """Logs flat `{"eval/<benchmark>/<metric>": value}` dicts against the training iteration.

    `run_id_file`: the run's id is read from it (to resume that run) and written to it.
    `use_active_run`: attach to the process's active run (Megatron's) when there is one."""

    name = "wandb"  # in the ledger's deliveries

    def __init__(
        self,
        config: WandbConfig,
        *,
        run_name: str,
        default_dir: Path,
        default_project: str | None,
        run_id_file: Path | None = None,
        use_active_run: bool = True,
        job_type: str = "eval",
    ):
        self.config = config
        self.run_name = run_name
        self.dir = Path(config.dir) if config.dir else default_dir
        self.project = config.project or default_project or "megatron-eval"
        self.run_id_file = run_id_file
        self.use_active_run = use_active_run
        self.job_type = job_type
        self._run: Any = None
        self._own_run = False
        self._last_step: int | None = None  # the W&B step of the latest row logged here

    def _attach(self) -> Any:
        import wandb

        if self._run is not None and (self._own_run or wandb.run is self._run):
            return self._run  # Megatron's run counts only while it is still the active one
        if self.use_active_run and wandb.run is not None:
            self._run, self._own_run = wandb.run, False
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            run_id = read_run_id(self.run_id_file)
            self._run = wandb.init(
                project=self.project,
                entity=self.config.entity,
                name=self.run_name,
                dir=str(self.dir),
                mode=self.config.mode,
                job_type=self.job_type,
                reinit="create_new",
                **({"id": run_id, "resume": "allow"} if run_id else {}),
            )
            self._own_run = True
            atexit.register(self.close)  # Megatron tells plugins nothing when training ends
        write_run_id(self.run_id_file, self._run.id)
        self._run.define_metric(STEP_KEY)
        self._run.define_metric("eval/*", step_metric=STEP_KEY)
        logger.info("eval scores go to W&B run %s (%s)", self._run.name, "own" if self._own_run else "Megatron's")
        return self._run

    def log(self, iteration: int, values: dict[str, float]) -> None:
        """One W&B row holding `values` and `eval/iteration`: the row of the training loss at `iteration`
        when W&B is not past it yet, else the row being written (a late result). Steps never go back
        (W&B drops such rows), and two results never share a row (the second would overwrite the
        first's `eval/iteration`): a second result for the same row opens the next one, so a caller
        logging late results logs at most one per training step while Megatron still logs."""
        run = self._attach()
        step = max(iteration, run.step)
        if step == self._last_step:
            step += 1
        run.log({STEP_KEY: iteration, **values}, step=step)
        self._last_step = step
        self._alert(run, iteration, values)

    def _alert(self, run: Any, iteration: int, values: dict[str, float]) -> None:
        """A W&B alert (e-mail, Slack, as the user's W&B settings say) for the regressions among `values`, when the
        run is online; offline, the `eval/<benchmark>/regression` points logged above are the record."""
        drops = {key.split("/")[1]: value for key, value in values.items() if key.endswith("/regression")}
        if not drops or run.offline:
            return
        text = ", ".join(f"{benchmark} {drop:+.3f}" for benchmark, drop in drops.items())
        try:
            run.alert(title=f"eval regression: {self.run_name}, iteration {iteration}", text=text, level="WARN")
        except Exception as error:  # the scores are logged; the alert is a courtesy
            logger.warning("W&B alert for iteration %d not sent: %s: %s", iteration, type(error).__name__, error)

    @property
    def last_step(self) -> int | None:
        """The W&B step of the latest row logged here."""
        return self._last_step

    def committed(self, step: int) -> bool:
        """Whether W&B has written the row of `step`. W&B holds a row open until a later step is logged (more keys
        may come for it): a process killed before then loses it. `run.step` asks W&B's own process, whose step
        has passed `step` once it closed that row."""
        return self._attach().step > step

    def close(self) -> None:
        if self._own_run and self._run is not None:
            self._run.finish()
        self._run = None


def resume_megatron_run() -> None:
    """Make Megatron's own `wandb.init` (in `parse_and_validate_args`) resume the run whose id is
    kept in the hook's output folder, and keep the id of the run it opens there.

    Called by the hook's argument provider, inside Megatron's `parse_args`, before Megatron
    initialises W&B: it wraps `megatron.training.global_vars._set_wandb_writer`, which then
    acts for the arguments it is given. Without `--eval-hook-config`, or when the config turns
    W&B off, Megatron's W&B set-up runs untouched."""
    try:
        from megatron.training import global_vars
    except ImportError:  # not inside Megatron's argument parsing: nothing opens a W&B run to resume
        return
    original = getattr(global_vars, "_set_wandb_writer", None)
    if original is None or getattr(original, "__wrapped_by_eval_hook__", False):
        if original is None:
            logger.warning("this Megatron has no _set_wandb_writer: a restarted job opens a new W&B run")
        return

    @functools.wraps(original)
    def _set_wandb_writer(args: Any) -> None:
        path = _megatron_run_id_file(args)
        if path is None:
            original(args)
            return
        with _resuming(read_run_id(path)):
            original(args)
        import wandb

        if wandb.run is not None:
            write_run_id(path, wandb.run.id)

    _set_wandb_writer.__wrapped_by_eval_hook__ = True  # type: ignore[attr-defined]
    global_vars._set_wandb_writer = _set_wandb_writer


def _megatron_run_id_file(args: Any) -> Path | None:
    """The run-id file for Megatron's W&B run, or None when Megatron opens no run here or the hook is off."""
    opens_run = getattr(args, "wandb_project", "") and args.rank == args.world_size - 1
    if not opens_run or getattr(args, "eval_hook_config", None) is None or not args.save:
        return None
    from megatron_eval_hook.config import ConfigError, load_config, resolve_output_dir

    try:
        config = load_config(args.eval_hook_config, args.eval_hook_override or [])
    except ConfigError:
        return None  # install() reports it right after, before training starts
    if not (config.enabled and config.wandb.enabled):
        return None
    return run_id_file(resolve_output_dir(config, args.save))


@contextmanager
def _resuming(run_id: str | None):
    """W&B's environment for the next `wandb.init`: resume `run_id` (unless the user chose a run already)."""
    if run_id is None or os.environ.get("WANDB_RUN_ID"):
        yield
        return
    saved = {name: os.environ.get(name) for name in ("WANDB_RUN_ID", "WANDB_RESUME")}
    os.environ["WANDB_RUN_ID"] = run_id
    os.environ.setdefault("WANDB_RESUME", "allow")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
