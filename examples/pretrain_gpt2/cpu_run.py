"""Command lines for running `pretrain_gpt2.py` on CPU (the demo and the tests).

Only the CPU-specific flags live here: gloo instead of NCCL, weights built on the CPU, the
fused CUDA kernels off, and no gradient clipping (Megatron's clip_grads asserts CUDA tensors).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from pathlib import Path

PRETRAIN_GPT2 = Path(__file__).resolve().parent / "pretrain_gpt2.py"

CPU_ARGS = (
    "--distributed-backend", "gloo", "--use-cpu-initialization", "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
    "--no-masked-softmax-fusion", "--no-persist-layer-norm", "--clip-grad", "0.0",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(script_and_args: Sequence[str], nproc: int = 1) -> list[str]:
    """`torchrun --nproc-per-node N` on this machine's loopback, as a list for subprocess."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *script_and_args,
    ]  # fmt: skip
