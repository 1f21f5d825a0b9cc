"""Evaluate every Megatron-LM checkpoint with Stanford HELM, in-process, right after it is saved.

Two calls wire the hook into a Megatron pretraining script::

    args = parse_and_validate_args(extra_args_provider=add_eval_hook_args(), ...)
    install(args)

Both are cheap to import: torch, Megatron and HELM load only when the hook is installed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["add_eval_hook_args", "install"]
__version__ = "0.1.0"

ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def add_eval_hook_args(inner: ArgsProvider | None = None) -> ArgsProvider:
    """Return a Megatron `extra_args_provider` that adds the hook's flags after `inner`'s.

    `--eval-hook-config PATH` turns the hook on; `--eval-hook-override key=value` (repeatable)
    changes one config key, in Hydra's override syntax.

    The provider also makes a job restarted from a checkpoint log into the W&B run it logged to
    before: Megatron opens its W&B run right after parsing, before `install`, so this is set up here.
    """

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if inner is not None:
            parser = inner(parser)
        from megatron_eval_hook.sinks.wandb import resume_megatron_run

        resume_megatron_run()
        if any("--eval-hook-config" in action.option_strings for action in parser._actions):
            return parser  # added already (a patched script run through the launcher)
        group = parser.add_argument_group(title="megatron_eval_hook")
        group.add_argument(
            "--eval-hook-config",
            type=str,
            default=None,
            metavar="PATH",
            help="YAML config of the HELM evaluation hook (e.g. conf/helm.yaml); the hook is off without it.",
        )
        group.add_argument(
            "--eval-hook-override",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="Hydra override of one hook config key, e.g. schedule.every=1000. Repeatable.",
        )
        return parser

    return provider


def install(args: Any) -> Any:
    """Install the evaluation hook for a parsed Megatron `args` namespace.

    Does nothing and returns None when `args.eval_hook_config` is unset. Otherwise loads and
    validates the config, wraps Megatron's `save_checkpoint`, and returns the live `EvalHook`.
    A config or run the hook refuses stops the job before training starts (`refuse`).
    """
    if getattr(args, "eval_hook_config", None) is None:
        return None
    from megatron_eval_hook.config import ConfigError
    from megatron_eval_hook.hook import install_hook

    try:
        return install_hook(args)
    except ConfigError as error:
        refuse(error, args)


OTHER_RANKS_WAIT_S = 60.0


def refuse(error: Exception, args: Any) -> None:
    """Stop the job, exit status 2, with `error` said once as one block (what, where from, the fix), not in a
    traceback. The last rank says it: every refusal is found there (some only there: the ledger is its own);
    other ranks leave silently, after it: torchrun's root cause is the first failure it observes, and it stops
    the other workers once one has failed. Under torchrun the block goes into the error file torchrun gives
    each worker, and its closing summary shows it, last, as the root cause; elsewhere on stderr."""
    import json
    import os
    import sys
    import time

    world_size = int(getattr(args, "world_size", 1) or 1)
    if int(getattr(args, "rank", 0) or 0) != world_size - 1:
        # Ranks reach this at different times (a loaded node, the last rank's own checks): wait for the saying
        # rank to fail first, and torchrun to stop this one; leave anyway if nothing stops it.
        time.sleep(OTHER_RANKS_WAIT_S)
        _exit(2)
    block = f"megatron_eval_hook: training not started.\n{error}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    try:
        with open(error_file, "w") as file:  # type: ignore[arg-type]
            json.dump({"message": block, "timestamp": int(time.time())}, file)
    except (OSError, TypeError):  # not under torchrun, or its file cannot be written: say it here
        print(f"\n{block}\n", file=sys.stderr, flush=True)
    _exit(2)


def _exit(status: int) -> None:
    """Leave now: no interpreter teardown (Megatron's W&B run would take seconds to close, and a rank still
    closing when another leaves is stopped by torchrun, its own failure then reported as a signal)."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
