"""The project's log lines: one logger, ``megatron_eval_hook``, on standard output, each line prefixed with
who wrote it (``[eval-hook]`` in training and in the async eval process, ``[backfill]`` in the command)."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("megatron_eval_hook")


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a line is logged (a command's output may be redirected later)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def log_to_stdout(prefix: str, quiet_libraries: bool = False) -> None:
    """The project's lines on standard output as ``<prefix> message``; once per process (a second call keeps
    the first set-up). `quiet_libraries`: also silence the import-time warnings and INFO chatter of Megatron,
    torch, absl and datasets, for a process that is the project's own (never in a training process, whose
    warnings are the user's)."""
    if quiet_libraries:
        import warnings

        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module="(megatron|torch)")
        for name in ("absl", "datasets"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not logger.handlers:
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
