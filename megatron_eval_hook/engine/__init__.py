"""Log-prob scoring and greedy generation on a Megatron `GPTModel` (see `core.py`), on one rank or sharded.

- `requests.py`: what the engine is asked and answers (plain, picklable data);
- `plan.py`: prefix trees, forward passes, decoding groups and data-parallel shares (pure, no model);
- `attention.py`: the engine's core attention over prefix trees and a key/value cache;
- `backend.py`: forward passes, local or tensor/pipeline-parallel, reading only the needed log-probabilities;
- `cpu.py`: oneDNN linear layers, applied on CPU only;
- `core.py`: the `Engine`, which runs a plan through a backend;
- `sharded.py`: one HELM rank's requests computed by every data-parallel replica of a training job.
"""

from megatron_eval_hook.engine.core import Engine, fast_path_unsupported
from megatron_eval_hook.engine.cpu import OneDnnLinear, onednn_linear
from megatron_eval_hook.engine.plan import CPU_PASS_POSITIONS, Planner
from megatron_eval_hook.engine.requests import (
    END_OF_TEXT,
    LENGTH,
    STOP,
    Generation,
    GenerationRequest,
    RequestTooLong,
)

__all__ = [
    "CPU_PASS_POSITIONS",
    "END_OF_TEXT",
    "LENGTH",
    "STOP",
    "Engine",
    "Generation",
    "GenerationRequest",
    "OneDnnLinear",
    "Planner",
    "RequestTooLong",
    "fast_path_unsupported",
    "onednn_linear",
]
