"""The CPU engine's allocator setting: memory freed by one forward pass is reused by the next without page faults."""

from __future__ import annotations

import resource

import torch

from megatron_eval_hook.allocator import keep_freed_memory


def mlp_step(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> int:
    """Minor page faults taken by one MLP forward on tensors over glibc's 32 MiB mmap threshold."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    hidden = torch.nn.functional.linear(x, up)  # [4096, 3072] float32: 48 MiB
    out = torch.nn.functional.linear(torch.nn.functional.gelu(hidden), down)
    del hidden, out
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_large_activations_reuse_freed_memory():
    assert keep_freed_memory()
    x, up, down = torch.randn(4096, 768), torch.randn(3072, 768), torch.randn(768, 3072)
    faults = [mlp_step(x, up, down) for _ in range(4)]
    pages = 2 * 4096 * 3072 * 4 // 4096  # the two 48 MiB activations; glibc's default faults each of them in
    assert faults[-1] < pages // 10, faults
