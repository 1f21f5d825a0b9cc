"""Snapshots: a training rank's shard of the weights copied into host memory, and reassembled elsewhere.

Each training rank describes its part of the model with Megatron's own sharded state dict: for
every tensor, its checkpoint key, the global shape and this rank's offset in it (the layout
dist-checkpointing saves with). Only main replicas are copied: a tensor held by several ranks
(data-parallel copies, layer norms under tensor parallelism, the embedding tied across pipeline
stages) is copied by exactly one of them. The copies go into one flat byte buffer per rank, at
offsets fixed on the first save, so a snapshot is a handful of memory copies and nothing is
allocated in the training loop. `load_snapshot` writes the shards of every rank into a model
without tensor or pipeline parallelism, each into its slice of the full tensor.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

ALIGNMENT = 64  # bytes: every shard starts on a cache line, which also suits any dtype's view


@dataclass(frozen=True)
class Shard:
    """One tensor of one rank: where it sits in the global tensor and in a snapshot buffer."""

    key: str  # the checkpoint key (layers stacked: per-layer tensors share a key, the layer is an offset)
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    shape: tuple[int, ...]  # this shard's shape (the global shape without the stacked axes, sliced)
    dtype: torch.dtype
    offset: int = 0  # bytes from the start of the buffer

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize

    @property
    def stacked(self) -> int:
        """How many leading axes of the global shape are stacking axes (e.g. the layer number)."""
        return len(self.global_shape) - len(self.shape)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def main_replicas(chunks: Iterable[Any]) -> list[tuple[Shard, torch.Tensor]]:
    """The tensors of these model chunks (bare GPTModels) that this rank copies, with their shards,
    laid out one after the other (`Shard.offset` from 0)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    found: list[tuple[Shard, torch.Tensor]] = []
    offset = 0
    for chunk in chunks:
        sharded = chunk.sharded_state_dict()
        apply_factories(sharded)  # e.g. SwiGLU's fc1 split in two: views of the parameter
        for tensor in nested_values(sharded):
            if not isinstance(tensor, ShardedTensor) or tensor.key.endswith("_extra_state"):
                continue
            replica = tensor.replica_id if isinstance(tensor.replica_id, tuple) else (tensor.replica_id,)
            if any(replica):
                continue  # another rank copies this one
            if tensor.flattened_range is not None:
                raise ValueError(f"{tensor.key}: a flattened shard (optimizer state layout), not a model tensor")
            shard = Shard(
                tensor.key,
                tuple(tensor.global_shape),
                tuple(tensor.global_offset),
                tuple(tensor.data.shape),
                tensor.data.dtype,
                offset,
            )
            found.append((shard, tensor.data))
            offset = aligned(offset + shard.nbytes)
    return found


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def extent(shards: Sequence[Shard]) -> int:
    """Bytes a buffer needs for `shards`."""
    return aligned(max((s.offset + s.nbytes for s in shards), default=0))


def moved(shards: Iterable[Shard], base: int) -> list[Shard]:
    """`shards` placed `base` bytes further into a buffer."""
    return [replace(shard, offset=shard.offset + base) for shard in shards]


def view(buffer: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The slice of the flat uint8 `buffer` holding `shard`, as a tensor of its dtype and shape."""
    return buffer[shard.offset : shard.offset + shard.nbytes].view(shard.dtype).view(shard.shape)


def copy_into(buffer: torch.Tensor, sources: Sequence[tuple[Shard, torch.Tensor]], base: int = 0) -> None:
    """Copy each source tensor into its place in `buffer` (`base` bytes in); returns once all are there."""
    cuda = False
    for shard, tensor in sources:
        view(buffer, replace(shard, offset=shard.offset + base)).copy_(tensor.detach(), non_blocking=True)
        cuda = cuda or tensor.is_cuda
    if cuda:
        torch.cuda.current_stream().synchronize()


class SharedBuffer:
    """`nbytes` of host memory another process can map: an anonymous memory file (no name, so
    nothing is left behind when the processes end), pinned for fast device copies when CUDA is there."""

    def __init__(self, nbytes: int, fd: int | None = None):
        self.nbytes = nbytes
        if fd is None:
            fd = os.memfd_create("megatron-eval-snapshot", os.MFD_CLOEXEC)
            os.ftruncate(fd, max(nbytes, 1))
        self.fd = fd
        # Pages mapped now: a snapshot copy must not pay the page faults of fresh memory.
        self._map = mmap.mmap(fd, max(nbytes, 1), flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0)
        self._pinned = False
        if nbytes and torch.cuda.is_available():
            cudart = torch.cuda.cudart()
            self._pinned = cudart.cudaHostRegister(self.tensor.data_ptr(), nbytes, 0) == 0

    def close(self) -> None:
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._pinned = False
        self.tensor = torch.empty(0)
        try:
            self._map.close()
        except BufferError:  # a view of the map is still alive; the memory goes when the process ends
            pass
        os.close(self.fd)


def load_snapshot(gpt: Any, shards: Sequence[Shard], buffer: torch.Tensor) -> None:
    """Write the snapshot in `buffer` (described by `shards`, from every rank) into `gpt`, a GPTModel
    without tensor or pipeline parallelism. Raises ValueError when the snapshot does not cover a
    tensor of `gpt` exactly.

    A tensor of `gpt` may itself be several pieces of one checkpoint tensor (SwiGLU's fc1: its gate and
    its up halves, each a view of the parameter): each snapshot shard is written into every piece it
    overlaps, at the overlap."""
    targets: dict[tuple, list[tuple[Shard, torch.Tensor]]] = {}
    for target, tensor in main_replicas([gpt]):
        targets.setdefault((target.key, target.global_offset[: target.stacked]), []).append((target, tensor))
    filled = {id(tensor): 0 for pieces in targets.values() for _, tensor in pieces}
    with torch.no_grad():
        for shard in shards:
            where = (shard.key, shard.global_offset[: shard.stacked])
            if where not in targets:
                raise ValueError(f"the snapshot holds {shard.key} {where[1]}, which the evaluation model lacks")
            source = view(buffer, shard)
            for target, tensor in targets[where]:
                overlap = []
                for start, size, target_start, target_size in zip(
                    shard.global_offset[shard.stacked :], shard.shape,
                    target.global_offset[target.stacked :], target.shape,
                ):  # fmt: skip
                    first, last = max(start, target_start), min(start + size, target_start + target_size)
                    if first >= last:
                        break
                    overlap.append((first, last, start, target_start))
                else:
                    tensor[tuple(slice(f - t, e - t) for f, e, _, t in overlap)].copy_(
                        source[tuple(slice(f - s, e - s) for f, e, s, _ in overlap)]
                    )
                    filled[id(tensor)] += _numel([e - f for f, e, _, _ in overlap])
    partial = [
        f"{target.key} {target.global_offset}"
        for pieces in targets.values()
        for target, tensor in pieces
        if filled[id(tensor)] != tensor.numel()
    ]
    if partial:
        raise ValueError(f"the snapshot does not cover {len(partial)} tensor(s) of the model, e.g. {partial[:3]}")


def _region(global_offset: Sequence[int], stacked: int, shape: Sequence[int]) -> tuple:
    """Where a shard sits in its global tensor: its stacked indices, then a slice per axis."""
    return tuple(global_offset[:stacked]) + tuple(
        slice(start, start + size) for start, size in zip(global_offset[stacked:], shape)
    )


def whole_tensors(gpt: Any) -> dict[str, torch.Tensor]:
    """Every tensor of `gpt`, a GPTModel without tensor or pipeline parallelism, whole under its checkpoint
    key (layers stacked), copied."""
    whole: dict[str, torch.Tensor] = {}
    for shard, tensor in main_replicas([gpt]):
        target = whole.setdefault(shard.key, torch.zeros(shard.global_shape, dtype=shard.dtype))
        target[_region(shard.global_offset, shard.stacked, shard.shape)] = tensor.detach()
    return whole


def load_whole(gpt: Any, whole: dict[str, torch.Tensor]) -> None:
    """Fill this rank's part of `gpt` (any tensor and pipeline layout, replicas included) from whole
    tensors by checkpoint key (`whole_tensors` of the same architecture)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = gpt.sharded_state_dict()
    apply_factories(sharded)
    with torch.no_grad():
        for tensor in nested_values(sharded):
            if isinstance(tensor, ShardedTensor) and not tensor.key.endswith("_extra_state"):
                stacked = len(tensor.global_shape) - tensor.data.dim()
                tensor.data.copy_(whole[tensor.key][_region(tensor.global_offset, stacked, tensor.data.shape)])
