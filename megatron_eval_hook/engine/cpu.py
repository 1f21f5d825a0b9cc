"""CPU accelerators, applied by the engine only when the model runs on the CPU in float32.

PyTorch runs a float32 CPU matmul through MKL, which on AMD processors runs at about half the speed of
oneDNN's kernels (bench/throughput.py measures both side by side): `fast_linears` routes the model's
linear layers through oneDNN (`OneDnnLinear`, weights reordered once into its blocked layout), and a
GELU MLP's first matmul also adds its bias and applies the GELU."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class OneDnnLinear:
    """oneDNN's linear (matmul plus bias) for float32 CPU tensors, each weight reordered into the kernel's
    blocked layout once and kept while the weight is the same tensor, unchanged (its storage and version).

    PyTorch runs a float32 CPU matmul through MKL, which on AMD processors runs at about half the speed
    of oneDNN's kernels (bench/throughput.py measures both side by side). Both compute in float32; only
    the order of the sums differs. The reordered weights (one more copy of the model's linear layers)
    are what oneDNN would otherwise make at every call: measured on GPT-2 small's shapes, 16 rows 222 ->
    392 GFLOP/s, 100 rows 438 -> 501, 2048 rows 444 -> 482, with bit-identical results. `release` frees
    them."""

    PACKED_FOR_ROWS = 2048  # the rows the blocked layout is chosen for; as fast at 16 to 2048 rows

    def __init__(self, op: Callable, reorder: Callable | None):
        self._op, self._reorder = op, reorder
        self._packed: dict[int, tuple[tuple[int, int], torch.Tensor, torch.Tensor]] = {}

    def __call__(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: str | None = None
    ) -> torch.Tensor:
        """input x weight^T + bias; with `gelu` ("erf" or "tanh", its approximation), GELU of that, applied
        by the kernel as it writes the output instead of as two more passes over it."""
        # oneDNN's post-op and its algorithm: the exact GELU is its "none"
        post, algorithm = ("none", "") if gelu is None else ("gelu", "none" if gelu == "erf" else "tanh")
        return self._op(input, self._pack(weight), bias, post, [], algorithm)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        if self._reorder is None:
            return weight
        stamp = (weight.data_ptr(), weight._version)
        entry = self._packed.get(id(weight))
        if entry is None or entry[0] != stamp or entry[2] is not weight:
            entry = (stamp, self._reorder(weight.detach(), self.PACKED_FOR_ROWS), weight)
            self._packed[id(weight)] = entry
        return entry[1]

    def release(self) -> None:
        self._packed.clear()


def onednn_linear(pack: bool = True) -> OneDnnLinear | None:
    """oneDNN's float32 linear (`OneDnnLinear`; `pack=False`: without reordered weights), or None where
    this torch build lacks it."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        probe = op(torch.ones(2, 1, 3), torch.ones(4, 3), torch.ones(4), "none", [], "")
    except (AttributeError, RuntimeError):
        return None
    if not torch.equal(probe, torch.full((2, 1, 4), 4.0)):
        return None
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if pack else None
    if reorder is not None:
        try:
            packed = op(torch.ones(2, 1, 3), reorder(torch.ones(4, 3), 2), torch.ones(4), "none", [], "")
        except RuntimeError:
            reorder = None
        else:
            reorder = reorder if torch.equal(packed, probe) else None
    return OneDnnLinear(op, reorder)


def _fusable_gelu(module: torch.nn.Module) -> str | None:
    """For a Megatron MLP computing GELU(x W1^T + b1) W2^T: the GELU it uses, "erf" (torch's gelu) or "tanh"
    (Megatron's bias-GELU fusion, the tanh approximation). None for any other module or MLP (gated, another
    activation, Transformer Engine's)."""
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.mlp import MLP

    if type(module) is not MLP or type(module.linear_fc1) is not ColumnParallelLinear:
        return None
    config = module.config
    if config.gated_linear_unit or config.use_te_activation_func or module.activation_func is not F.gelu:
        return None
    if module.linear_fc1.weight is None:
        return None
    return "tanh" if config.bias_activation_fusion else "erf"


def _fused_mlp(mlp, linear: OneDnnLinear, gelu: str, hidden_states, per_token_scale=None, **kwargs):
    """`MLP.forward` with the first linear layer's bias and the GELU applied by its kernel (Megatron adds
    the bias and applies GELU as two passes over the [positions, 4 x hidden] activations)."""
    if per_token_scale is not None:
        return type(mlp).forward(mlp, hidden_states, per_token_scale, **kwargs)
    fc1 = mlp.linear_fc1
    return mlp.linear_fc2(linear(hidden_states, fc1.weight, fc1.bias, gelu=gelu))


@contextmanager
def fast_linears(model: torch.nn.Module, linear: OneDnnLinear | None) -> Iterator[None]:
    """Run `model`'s linear layers through `linear` (oneDNN on CPU) for the duration of the block, with a GELU
    MLP's bias and activation in its first matmul (`_fused_mlp`); nothing changes when `linear` is None.

    Tensor-parallel layers keep their own collectives: only `_forward_impl`, the local matmul, is replaced
    (sequence parallelism, which gathers inside it, is off during an evaluation)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if linear is None:
        yield
        return
    layers = [m for m in model.modules() if type(m) in (ColumnParallelLinear, RowParallelLinear)]
    mlps = [(m, gelu) for m in model.modules() if (gelu := _fusable_gelu(m)) is not None]
    # an instance attribute shadows the class's method; deleting it restores that
    for layer in layers:
        layer._forward_impl = lambda input, weight, bias=None, **_: linear(input, weight, bias)
    for mlp, gelu in mlps:
        mlp.forward = functools.partial(_fused_mlp, mlp, linear, gelu)
    try:
        yield
    finally:
        for layer in layers:
            del layer._forward_impl
        for mlp, _ in mlps:
            del mlp.forward
