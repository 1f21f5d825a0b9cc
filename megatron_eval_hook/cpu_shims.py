"""CPU shims: let the real Megatron-LM training loop run on a machine without CUDA.

FOR THE CPU DEMO, THE TESTS, `megatron-eval backfill` ON A MACHINE WITHOUT CUDA, AND THE ASYNC
EVAL PROCESS WITH `eval_device: cpu` (where CUDA is hidden from it). The hook in the training
process never imports this module; nothing here is applied where CUDA is in use.

megatron-core 0.19.2 assumes CUDA in many places. ``apply()`` installs the smallest set of
process-wide patches we measured (docs/research/megatron-cpu.md, sections 1-3 and 7) so that
``megatron.training.pretrain`` trains, logs and saves torch_dist checkpoints for a tiny GPT
on CPU with the gloo backend. It is an integration smoke test, not a numerics or speed
reference.

``torch.cuda.is_available()`` keeps returning the truth (False); code that needs to know
whether the shims are on calls ``active()``.

Call ``apply()`` at module top level of the entry script (before importing megatron), not
under ``if __name__ == "__main__":``: torch_dist saves start a spawn-context
``multiprocessing.Manager`` whose child re-imports ``__main__`` and needs the shims too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
import typing

import torch
from torch.overrides import TorchFunctionMode

_active = False
_CPU_PROPERTIES = types.SimpleNamespace(name="cpu", major=0, minor=0, total_memory=0, multi_processor_count=1)


def active() -> bool:
    """True once ``apply()`` has run in this process."""
    return _active


def apply() -> None:
    """Install every CPU shim. Idempotent; safe to call before any megatron import."""
    global _active
    if _active:
        return
    _stub_triton_kernels()
    # megatron.training uses @typing.override, which Python 3.11 lacks.
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
    # Megatron's torch.compile'd fusions (jit_fuser, e.g. bias_gelu in set_jit_fusion_options'
    # warm-up) fail to compile on CPU; run them eagerly. The env var acts when megatron decorates
    # them at import (and in spawned children); the config flag covers an earlier import.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch._dynamo

    torch._dynamo.config.disable = True
    # validate_args asserts this when tensor parallel > 1 (a CUDA stream setting; inert on CPU).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _stub_torch_cuda()
    # Pushed once and never popped. Torch function modes are per thread: this covers the main
    # thread (where Megatron trains and saves), not threads started by other code.
    _CudaToCpu().__enter__()
    _patch_megatron()
    _active = True


def _stub_triton_kernels() -> None:
    # Importing megatron.core reaches moe/ops/paged_stash.py, which imports triton (a 1 GB
    # GPU-only wheel) at top level. Register a stand-in; the kernels only serve MoE paged stash.
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules or importlib.util.find_spec("triton") is not None:
        return

    def unavailable(*args, **kwargs):
        raise RuntimeError("MoE paged-stash kernels need triton and CUDA")

    module = types.ModuleType(name)
    module.GLOBAL_BLOCK_SIZE = 1024
    module.paged_stash_copy_kernel = module.paged_stash_pop_kernel = unavailable
    sys.modules[name] = module


def _stub_torch_cuda() -> None:
    cuda = torch.cuda
    # initialize_megatron sets up model-parallel groups and RNG seeds only if it sees a device.
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    # validate_args branches on the GPU architecture (tensor parallel); report "no arch".
    cuda.get_device_properties = lambda device=None: _CPU_PROPERTIES
    cuda.get_device_capability = lambda device=None: (0, 0)
    # Used as a device everywhere (torch.empty(..., device=torch.cuda.current_device())).
    cuda.current_device = lambda: torch.device("cpu")
    # Timers and checkpoint writes wait for the device; nothing to wait for on CPU.
    cuda.synchronize = lambda device=None: None
    # Seeding the RNG tracker and saving a checkpoint read the "cuda" RNG state; hand out the CPU one.
    cuda.get_rng_state = cuda.random.get_rng_state = lambda device="cuda": torch.get_rng_state()
    # DDP setup and grad buckets order work on side streams; CPU ops already run in order.
    cuda.Stream = _NoStream
    cuda.current_stream = cuda.default_stream = lambda device=None: _NoStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()


class _NoStream:
    """Stands in for a torch.cuda.Stream: every method (wait_stream, synchronize, ...) does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _CudaToCpu(TorchFunctionMode):
    """Rewrites device="cuda" / .cuda() / .to("cuda") to the CPU.

    Megatron hard-codes device="cuda" in many places (schedules, training loop all-reduces,
    data loader flags); this catches them all without patching each site.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _is_cuda(device) -> bool:
    return isinstance(device, str | torch.device) and torch.device(device).type == "cuda"


def _patch_megatron() -> None:
    import megatron.core.datasets.utils as dataset_utils
    import megatron.training.initialize as initialize
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    # Dropout runs under get_cuda_rng_tracker().fork(), which swaps CUDA generator states.
    # On CPU dropout draws from the CPU generator, so skip the swap; otherwise every fork logs
    # "CPU RNG state changed within GPU RNG context" and queues CUDA callbacks that never run.
    CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    # The wheel has no datasets Makefile, so initialize_megatron's `make` fails and exits;
    # the compiled helpers .so ships prebuilt. (This one is not CPU-specific.)
    dataset_utils.compile_helpers = lambda: None
    # pretrain() asserts torch.cuda.is_available() unless allow_no_cuda=True; flip the default
    # on the function object so every reference to it (training.py imported it by name) sees it.
    function = initialize.initialize_megatron
    assert function.__code__.co_varnames[0] == "allow_no_cuda", "initialize_megatron changed"
    function.__defaults__ = (True, *function.__defaults__[1:])
