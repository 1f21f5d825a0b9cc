"""The engine's core attention (`FastAttention`), swapped in for each layer's own during a call, and the plans
of its passes: attention over prefix trees packed without padding (`Trees`), and decoding against a
key/value cache (`Decoding`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_eval_hook.engine.plan import _PackedRow

# A padded batch of prefix trees (attention off the CPU) holds at most this many bytes of keys and values
# (the trunk's copied for every tree) and attention bias, one tree at least: a 7B model's 8k-token trunk is
# 128 MiB of keys and values per tree and layer in bf16.
PADDED_BATCH_BYTES = 256 << 20


KeysValues = tuple[torch.Tensor, torch.Tensor]  # keys, values [groups, positions, d]
Rotation = tuple[torch.Tensor, torch.Tensor]  # cos and sin of rotary angles, in the queries' dtype


@dataclass
class Trees:
    """The plan of a pass over prefix trees: the pass's positions are one sequence (b = 1) holding the trees
    one after the other, with no padding for the layers' matmuls to compute. Each node sees every position of
    its layer's trunk, when there is one, then itself and its ancestors.

    With `rows` (each tree's first position and mask) attention runs tree by tree, computing no padding: the
    CPU's choice. With `padded` (`tree_batches`) it runs on batches of trees of similar sizes gathered into
    padded rows: a few kernel calls per layer instead of a few per tree, for a GPU, where launches cost more
    than the padding's arithmetic. With `kept` (an empty dict), each layer leaves the pass's keys and values
    [positions, groups, d] there under its index, for the engine to cache."""

    rows: list[tuple[int, torch.Tensor]] | None = None  # first position, [1, 1, n, t + n] True: sees
    padded: tuple[list[_TreeBatch], torch.Tensor] | None = None  # the batches, each position's place in them
    trunks: Sequence[KeysValues] | None = None  # one per layer
    kept: dict[int, KeysValues] | None = None
    rotary: Rotation | None = None  # each position's rotation: cos, sin [positions, 1, 1, d'] (`rotated`)


@dataclass
class Decoding:
    """The plan of a decoding step: batch row i is row i of each layer's cache, feeding one token.

    A layer's cache holds each request's prompt part (after the trunk), padded to a common width, and apart
    from it its generated tokens: every row writes its new key and value at `step`, and attends to the trunk,
    its prompt part except the `padding`, and its generated tokens up to there. (Apart, the prompt parts are
    read whole, as one block of memory: the NarrativeQA bench call's decoding matmuls took 4.87 s, 5.48 s as
    slices of rows holding both.)"""

    caches: Sequence[tuple[torch.Tensor, ...]]  # per layer: prompt keys, values [rows, groups, width, d];
    # generated keys, values [rows, groups, steps, d]
    padding: torch.Tensor  # [rows, 1, 1, width] True where a prompt part has no key
    step: int
    trunks: Sequence[KeysValues] | None = None  # one per layer
    rotary: Rotation | None = None  # each row's new token's rotation: cos, sin [1, rows, 1, d'] (`rotated`)


class FastAttention(torch.nn.Module):
    """Core attention for the engine's forward passes, in place of a layer's own: the `layer`-th of this
    rank's attention layers.

    Takes Megatron's core-attention arguments: query [sq, b, heads, d], key and value [sk, b, groups, d]
    (learned positions already applied), and in place of the attention mask the pass's plan, which Megatron
    hands down unchanged from the model's `attention_mask` argument: `Trees` or `Decoding`. Rotary positions
    are applied here, from the plan's angles (each token at its own position: its depth in its tree, or its
    place after the trunk and prompt while decoding), not by Megatron. The module holds nothing between
    calls."""

    def __init__(self, scale: float, layer: int, interleaved: bool = False):
        super().__init__()
        self.scale = scale
        self.layer = layer
        self.interleaved = interleaved  # the rotary angles' layout (Megatron's `rotary_interleaved`)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, **_):
        plan = attention_mask
        if attention_bias is not None:
            raise ValueError("attention bias is not supported by the evaluation engine's attention")
        if isinstance(plan, Decoding):
            return self._decode(plan, query, key, value)
        if not isinstance(plan, Trees):
            raise TypeError(f"the engine's attention runs the engine's plans, not {type(plan).__name__}")
        if plan.rotary is not None:
            query, key = (rotated(t, plan.rotary, self.interleaved) for t in (query, key))
        positions, _, heads, dim = query.shape
        query, key, value = query[:, 0], key[:, 0], value[:, 0]  # [positions, heads or groups, d]
        trunk = plan.trunks[self.layer] if plan.trunks is not None else None
        if plan.kept is not None:
            plan.kept[self.layer] = key, value
        if plan.padded is not None:
            return self._attend_padded(plan.padded, trunk, query, key, value).view(positions, 1, heads * dim)
        shared = 0
        if trunk is not None:  # each tree's keys go after the trunk's, copied there once per call
            shared = trunk[0].shape[1]
            longest = max(allowed.shape[-2] for _, allowed in plan.rows)
            buffers = [part.new_empty(1, part.shape[0], shared + longest, dim) for part in trunk]
            for buffer, part in zip(buffers, trunk):
                buffer[0, :, :shared] = part
        outs = []
        for first, allowed in plan.rows:
            length = allowed.shape[-2]
            q, k, v = (t[first : first + length].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
            if shared:
                for buffer, part in zip(buffers, (k, v)):
                    buffer[:, :, shared : shared + length] = part
                k, v = (buffer[:, :, : shared + length] for buffer in buffers)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=self.scale, enable_gqa=k.shape[1] != heads
            )
            outs.append(out[0].transpose(0, 1))  # [length, heads, d]
        return torch.cat(outs).view(positions, 1, heads * dim)

    def _attend_padded(self, padded, trunk, query, key, value):
        """One attention call per batch of trees: each tree gathered into a row of [trees, longest], its keys
        after the trunk's, the padding masked by the batch's bias; the outputs go back to the pass's positions."""
        batches, scatter = padded
        outs = []
        for batch in batches:
            trees, length = batch.gather.shape
            q, k, v = (t[batch.gather].transpose(1, 2) for t in (query, key, value))  # [trees, heads or groups, n, d]
            if trunk is not None:
                k, v = (torch.cat([part.expand(trees, *part.shape), own], dim=2) for part, own in zip(trunk, (k, v)))
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=batch.bias, scale=self.scale, enable_gqa=k.shape[1] != q.shape[1]
            )
            outs.append(out.transpose(1, 2).reshape(trees * length, -1))
        return (outs[0] if len(outs) == 1 else torch.cat(outs))[scatter]

    def _decode(self, plan: Decoding, query, key, value):
        """One new token per cache row. The trunk's keys are stored once, not per row, so its scores are
        a matmul of their own; the trunk, the prompt parts and the generated tokens share one softmax
        (scores in float32, as eager attention)."""
        if plan.rotary is not None:
            query, key = (rotated(t, plan.rotary, self.interleaved) for t in (query, key))
        prompt_keys, prompt_values, new_keys, new_values = plan.caches[self.layer]
        trunk = plan.trunks[self.layer] if plan.trunks is not None else None
        rows, groups, width, dim = prompt_keys.shape
        heads = query.shape[2]
        new_keys[:, :, plan.step] = key[0]
        new_values[:, :, plan.step] = value[0]
        new_keys, new_values = new_keys[:, :, : plan.step + 1], new_values[:, :, : plan.step + 1]
        # the scale is applied to the query: exact when it is a power of two (1/8 for 64-wide heads)
        query = (query[0] * self.scale).reshape(rows, groups, heads // groups, dim)
        # [rows, groups, heads/groups, keys] as keys x query: the sums of query x keys^T, faster batched
        by_key = query.transpose(-1, -2)
        prompt_scores = torch.matmul(prompt_keys, by_key).transpose(-1, -2).masked_fill_(plan.padding, -math.inf)
        parts = [prompt_scores, torch.matmul(new_keys, by_key).transpose(-1, -2)]
        shared = 0
        if trunk is not None:
            trunk_keys, trunk_values = trunk
            shared = trunk_keys.shape[1]
            by_group = query.permute(1, 0, 2, 3).reshape(groups, -1, dim)  # [groups, rows * heads/groups, d]
            trunk_scores = torch.matmul(by_group, trunk_keys.transpose(-1, -2))
            parts.insert(0, trunk_scores.view(groups, rows, -1, shared).permute(1, 0, 2, 3))
        scores = torch.cat([part.float() for part in parts], dim=-1)
        weights = torch.softmax(scores, dim=-1).to(prompt_values.dtype)
        prompt_end = shared + width
        out = torch.matmul(weights[..., shared:prompt_end], prompt_values)  # [rows, groups, heads/groups, d]
        out += torch.matmul(weights[..., prompt_end:], new_values)
        if shared:
            by_group = weights[..., :shared].permute(1, 0, 2, 3).reshape(groups, -1, shared)
            out += torch.matmul(by_group, trunk_values).view(groups, rows, -1, dim).permute(1, 0, 2, 3)
        return out.reshape(1, rows, heads * dim)


def rotated(t: torch.Tensor, rotation: Rotation, interleaved: bool) -> torch.Tensor:
    """`t` [s, b, heads, d] with its first d' channels rotated by angles whose cos and sin are `rotation`
    ([s or 1, b or 1, 1, d'] each, computed in float32 and then cast to `t`'s dtype, as Megatron's unfused
    rotary embedding does): by halves, or by neighbouring pairs when `interleaved`."""
    cos, sin = rotation
    width = cos.shape[-1]
    t, rest = t[..., :width], t[..., width:]
    if interleaved:
        turned = torch.stack((-t[..., 1::2], t[..., 0::2]), dim=-1).flatten(-2)
    else:
        first, second = torch.chunk(t, 2, dim=-1)
        turned = torch.cat((-second, first), dim=-1)
    return torch.cat((t * cos + turned * sin, rest), dim=-1)


@dataclass(frozen=True)
class _TreeBatch:
    """Trees of similar sizes padded to one length, attended in one call (`FastAttention._attend_padded`)."""

    gather: torch.Tensor  # [trees, longest]: the pass position of each tree's node (0 in the padding)
    bias: torch.Tensor  # [trees, 1, longest, trunk + longest]: 0 where a node sees a key, -inf elsewhere


def tree_batches(
    rows: Sequence[_PackedRow], offsets: list[int], shared: int, config, dtype: torch.dtype, device: torch.device
) -> tuple[list[_TreeBatch], torch.Tensor]:
    """`rows` laid out at `offsets` as padded batches of trees, each node seeing the `shared` keys of the
    trunk first, and each pass position's place in the batches' flattened outputs, one after the other
    (`config`: the model's, for the size of its keys and values).

    Largest first, a tree under half the size of its batch's first starts a new batch: the padding stays
    under 3/4 of a batch's area (the bias's memory within 4 x the attention's real work). So does a tree
    past PADDED_BATCH_BYTES. A padding query sees only its own (padding) key: its output is finite, and
    dropped."""
    key_value = 2 * (config.num_query_groups or config.num_attention_heads) * config.kv_channels
    groups: list[list[int]] = []
    longest = capacity = 0  # the current batch's first (largest) tree, and how many trees it may hold
    for r in sorted(range(len(rows)), key=lambda r: -len(rows[r].tokens)):
        n = len(rows[r].tokens)
        if 2 * n < longest or not groups or len(groups[-1]) == capacity:
            groups.append([])
            longest = n
            capacity = max(1, PADDED_BATCH_BYTES // ((shared + n) * (key_value + n) * dtype.itemsize))
        groups[-1].append(r)
    scatter = np.empty(offsets[-1] + len(rows[-1].tokens), dtype=np.int64)
    batches, placed = [], 0
    for group in groups:
        longest = len(rows[group[0]].tokens)
        gather = np.zeros((len(group), longest), dtype=np.int64)
        seen = np.zeros((len(group), longest, longest), dtype=bool)
        for b, r in enumerate(group):
            n, first = len(rows[r].tokens), offsets[r]
            gather[b, :n] = np.arange(first, first + n)
            scatter[first : first + n] = np.arange(placed + b * longest, placed + b * longest + n)
            seen[b, :n, :n] = rows[r].visible()
            seen[b, np.arange(n, longest), np.arange(n, longest)] = True
        placed += len(group) * longest
        # the bias's rows start at multiples of 16 elements, as memory-efficient attention kernels require
        width = -(-(shared + longest) // 16) * 16
        bias = torch.zeros(len(group), 1, longest, width, dtype=dtype, device=device)[..., : shared + longest]
        bias[:, 0, :, shared:].masked_fill_(~torch.from_numpy(seen).to(device), -math.inf)
        batches.append(_TreeBatch(torch.from_numpy(gather).to(device), bias))
    return batches, torch.from_numpy(scatter).to(device)
