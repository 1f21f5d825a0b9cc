"""`examples/pretrain_gpt2/pretrain_gpt2.py` with a fault injected into one of the hook's call sites at chosen saves.

    EVAL_HOOK_FAULTS="ledger@1,wandb@2,tensorboard@3,helm@4,engine@5" torchrun ... tests/faulty_pretrain.py <args>

At the save of iteration N, the call site named for N raises as it would when that part breaks:
- `ledger`: every ledger write of the save path (blocked time, closing the attempt), as on a full disk;
- `wandb`, `tensorboard`: the sink's `log`;
- `wandb-hangs`: the W&B sink's `log` never returns (the scores are in the ledger, not in W&B: a kill then);
- `helm`: HELM's run of a benchmark;
- `engine`: the engine's scoring and generation;
- `snapshot`: the async placement's copy of the last rank's weights into host memory.

Under the async placement the evaluation runs in the eval process, which these patches do not reach: there
only `snapshot` and the sinks apply.
"""

from __future__ import annotations

import os
import runpy
import sqlite3
import sys
import time
from pathlib import Path

from megatron_eval_hook import cpu_shims

cpu_shims.apply()

from megatron_eval_hook import hook  # noqa: E402
from megatron_eval_hook.engine import Engine  # noqa: E402
from megatron_eval_hook.helm.runner import HelmSuite  # noqa: E402
from megatron_eval_hook.ledger import Ledger  # noqa: E402
from megatron_eval_hook.placement import async_eval  # noqa: E402
from megatron_eval_hook.sinks.tensorboard import TensorBoardSink  # noqa: E402
from megatron_eval_hook.sinks.wandb import WandbSink  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "pretrain_gpt2" / "pretrain_gpt2.py"
FAULTS = {
    int(iteration): site
    for site, iteration in (item.split("@") for item in os.environ.get("EVAL_HOOK_FAULTS", "").split(",") if item)
}
SAVING: list[int] = [0]  # the iteration whose save the hook is handling


def failing(site: str, method, error: Exception):
    def call(*args, **kwargs):
        if FAULTS.get(SAVING[0]) == site:
            raise error
        return method(*args, **kwargs)

    return call


def hanging(site: str, method):
    def call(*args, **kwargs):
        while FAULTS.get(SAVING[0]) == site:
            time.sleep(1.0)
        return method(*args, **kwargs)

    return call


def saving(after_save):
    def call(self, iteration, *args, **kwargs):
        SAVING[0] = iteration
        return after_save(self, iteration, *args, **kwargs)

    return call


full = sqlite3.OperationalError("database or disk is full")
for name in ("set_blocked", "finish_ok", "finish_failed"):
    setattr(Ledger, name, failing("ledger", getattr(Ledger, name), full))
WandbSink.log = hanging("wandb-hangs", failing("wandb", WandbSink.log, ConnectionError("injected: W&B unreachable")))
TensorBoardSink.log = failing("tensorboard", TensorBoardSink.log, OSError(28, "injected: No space left on device"))
HelmSuite._run = failing("helm", HelmSuite._run, RuntimeError("injected: HELM failed"))
Engine.score = failing("engine", Engine.score, RuntimeError("injected: the engine failed"))
Engine.generate = failing("engine", Engine.generate, RuntimeError("injected: the engine failed"))
async_eval.copy_into = failing("snapshot", async_eval.copy_into, MemoryError("injected: no host memory"))
hook.EvalHook.after_save = saving(hook.EvalHook.after_save)

if __name__ == "__main__":
    sys.argv[0] = str(SCRIPT)
    runpy.run_path(str(SCRIPT), run_name="__main__")
