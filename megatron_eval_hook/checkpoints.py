"""Megatron save folders on disk: which iterations are complete, and the arguments each was saved with.

A save folder (`--save`) holds one `iter_XXXXXXX/` folder per checkpoint and the tracker file
`latest_checkpointed_iteration.txt`, which Megatron rewrites only once a save has completed on
every rank (with `--async-save` too, when the save is finalized). An `iter_*` folder above the
tracker's iteration is a save still being written, or one that never finished.

Only Megatron's `torch_dist` format is read (PyTorch distributed checkpoint files and a
`.metadata` file per iteration), whatever tensor/pipeline-parallel layout it was saved with.
Nothing here needs a process group or Megatron's initialisation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

TRACKER = "latest_checkpointed_iteration.txt"
_ITERATION_FOLDER = re.compile(r"iter_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint or save folder cannot be read; the message names it, why, and the fix."""


def iteration_folder(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def tracker_iteration(save_dir: str | Path) -> int | None:
    """The iteration of the latest completed save, from the tracker file; None when there is none yet."""
    path = Path(save_dir) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(
            f"{path} holds {text!r}, not an iteration number (a 'release' checkpoint is not a training save). "
            "Fix: pass the --save folder of a training run."
        ) from None


def saved_iterations(save_dir: str | Path) -> list[int]:
    """Every `iter_*` folder of `save_dir`, complete or not, in order."""
    found = (_ITERATION_FOLDER.fullmatch(p.name) for p in Path(save_dir).iterdir() if p.is_dir())
    return sorted(int(match.group(1)) for match in found if match)


def complete_iterations(save_dir: str | Path) -> list[int]:
    """The iterations whose save completed: `iter_*` folders up to the tracker's iteration."""
    latest = tracker_iteration(save_dir)
    if latest is None:
        return []
    return [i for i in saved_iterations(save_dir) if i <= latest]


def check_save_dir(save_dir: str | Path, flag: str) -> Path:
    """`save_dir` as a folder, or CheckpointError naming `flag` and the fix."""
    folder = Path(save_dir).expanduser()
    if not folder.is_dir():
        problem = "is a file" if folder.exists() else "does not exist"
        raise CheckpointError(
            f"{flag} {save_dir}: the folder {problem}. Fix: pass the --save folder of the training run "
            f"(the folder holding {TRACKER} and the iter_* folders)."
        )
    if _ITERATION_FOLDER.fullmatch(folder.name):
        raise CheckpointError(
            f"{flag} {save_dir} is one iteration's folder. Fix: pass its parent, the --save folder "
            f"{folder.parent}, and --start/--end {int(folder.name[5:])} to evaluate only this iteration."
        )
    return folder


def checkpoint_folder(path: str | Path) -> Path:
    """The `iter_*` folder of a checkpoint: `path` itself, or the latest iteration of a save folder."""
    folder = Path(path)
    latest = tracker_iteration(folder) if folder.is_dir() else None
    if latest is not None:
        folder = iteration_folder(folder, latest)
    if not folder.is_dir():
        raise CheckpointError(
            f"{path}: no such checkpoint folder. Fix: pass a --save folder (with {TRACKER}) or one of its iter_* "
            "folders."
        )
    require_torch_dist(folder)
    return folder


def require_torch_dist(folder: Path) -> None:
    if not (folder / ".metadata").is_file():
        legacy = any(folder.glob("mp_rank_*"))
        raise CheckpointError(
            f"{folder} is not a torch_dist checkpoint (no .metadata file"
            + (", but mp_rank_* folders of Megatron's legacy torch format" if legacy else "")
            + "). Fix: save with --ckpt-format torch_dist, or convert the run once with Megatron's "
            "--ckpt-convert-format torch_dist --ckpt-convert-save DIR; an iteration whose save did not finish "
            "has no .metadata either."
        )


def is_last_save(args: Any, iteration: int) -> bool:
    """Whether the save at `iteration` is the run's last: at --train-iters, or at an --exit-interval."""
    exit_interval = getattr(args, "exit_interval", None)
    train_iters = getattr(args, "train_iters", None)
    return bool((train_iters and iteration >= train_iters) or (exit_interval and iteration % exit_interval == 0))


def tokens_seen(args: Any) -> int | None:
    """Training tokens consumed when these arguments were saved, when known."""
    samples = getattr(args, "consumed_train_samples", None)
    return int(samples * args.seq_length) if samples else None


def read_common_state(folder: Path) -> dict[str, Any]:
    """The non-tensor state of a torch_dist checkpoint (`args`, `iteration`, ...), without a process group."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    require_torch_dist(folder)
    try:
        state = load_common_state_dict(str(folder))
    except (Exception, CheckpointException) as error:
        raise CheckpointError(
            f"{folder}: the checkpoint cannot be read ({describe_read_error(error)}). Fix: check that the save "
            "finished and the files are intact; delete or skip this iteration with --start/--end."
        ) from error
    if "args" not in state:
        raise CheckpointError(
            f"{folder} stores no Megatron arguments ('args'): it was not written by Megatron's training loop. "
            "Fix: pass a --save folder of megatron.training.pretrain."
        )
    return state


def describe_read_error(error: BaseException) -> str:
    """One line for an error of PyTorch's checkpoint reader (whose own text holds every rank's traceback)."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))[0]
    return f"{type(error).__name__}: {error}"


def read_args(folder: Path) -> Any:
    """The Megatron arguments (`argparse.Namespace`) the checkpoint in `folder` was saved with."""
    return read_common_state(folder)["args"]
