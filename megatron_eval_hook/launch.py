"""Run an unmodified Megatron pretraining script with the evaluation hook installed.

    python -m megatron_eval_hook.launch pretrain_gpt.py <Megatron args> \\
        --eval-hook-config conf/helm.yaml [--eval-hook-override key=value ...]

Works under torchrun too (`torchrun ... -m megatron_eval_hook.launch pretrain_gpt.py ...`).
The launcher wraps `megatron.training.arguments.parse_and_validate_args`, which the script
imports by name, so that it also parses the hook's flags and installs the hook right after
Megatron validated its arguments; then it runs the script as `__main__`.
"""

from __future__ import annotations

import functools
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_eval_hook import add_eval_hook_args, install

USAGE = "usage: python -m megatron_eval_hook.launch SCRIPT.py [Megatron args] --eval-hook-config PATH"


def wrap_argument_parsing() -> None:
    """Make Megatron's `parse_and_validate_args` add the hook's flags and install the hook."""
    import megatron.training.arguments as arguments

    original = arguments.parse_and_validate_args
    if getattr(original, "__wrapped_by_eval_hook__", False):
        return

    @functools.wraps(original)
    def parse_and_validate_args(extra_args_provider=None, *args, **kwargs):
        parsed = original(add_eval_hook_args(extra_args_provider), *args, **kwargs)
        install(parsed)
        return parsed

    parse_and_validate_args.__wrapped_by_eval_hook__ = True  # type: ignore[attr-defined]
    arguments.parse_and_validate_args = parse_and_validate_args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        sys.exit(f"{USAGE}\nerror: the first argument must be the pretraining script, got {argv[:1]}")
    script = Path(argv[0])
    if not script.is_file():
        sys.exit(f"{USAGE}\nerror: no such script: {script}")
    wrap_argument_parsing()
    # As `python SCRIPT.py` would: the script's folder first on the path, its own argv.
    sys.path.insert(0, str(script.resolve().parent))
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":  # spawned checkpoint workers re-import this module: keep the guard
    main()
