"""How large the engine's passes and caches may be on this rank: the evaluation shares the device with
training's weights, gradients and optimizer state, so its sizes come from the memory free when it starts.

A forward pass of P positions and a key/value cache of C positions take about
``P x Footprint.position + C x Footprint.cache_position + RESERVED`` bytes beyond the weights: the estimate
counts the widest activations a layer holds at once (its input, the attention's query, keys and values, the
MLP's hidden layer, in the model's dtype), the keys and values every layer keeps of a prompt being
prefilled, and a fixed reserve for the output layer's logits chunk and the attention's masks and scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger("megatron_eval_hook")

# The share of the free memory the engine sizes itself for (the rest: fragmentation, the allocator's rounding).
MEMORY_SHARE = 0.8

# Beyond the per-position estimate: the output layer's logits chunk (OUTPUT_BYTES_GPU) and the padded tree
# batches' attention bias and scores (attention.PADDED_BATCH_BYTES, twice).
RESERVED = (1 << 30) + 2 * (256 << 20)


@dataclass(frozen=True)
class Sizes:
    """What the engine plans for: positions per packed forward pass, per decoding group's key/value cache,
    and per forward pass of the plain path (padded sequences, Megatron's own attention)."""

    pass_positions: int
    cache_positions: int
    plain_positions: int

    def smallest(self, *others: Sizes) -> Sizes:
        """The sizes every one of these ranks can hold: each the minimum."""
        every = (self, *others)
        return Sizes(
            min(s.pass_positions for s in every),
            min(s.cache_positions for s in every),
            min(s.plain_positions for s in every),
        )


@dataclass(frozen=True)
class Footprint:
    """Bytes per position on this rank: of a packed forward pass (`position`), of the key/value cache, every
    local layer's keys and values (`cache_position`), and of a plain pass over sequences as long as the
    context window, whose attention scores Megatron's own attention may hold in float32 (`plain_position`)."""

    position: int
    cache_position: int
    plain_position: int

    @classmethod
    def of(cls, model: torch.nn.Module, window: int) -> Footprint:
        """From the model's config and the layers on this rank (its pipeline stage, its tensor-parallel part);
        `window`: the context window, in tokens."""
        from megatron.core.transformer.attention import SelfAttention

        config = model.config
        tp = config.tensor_model_parallel_size or 1
        layers = sum(1 for m in model.modules() if isinstance(m, SelfAttention))
        heads = config.num_attention_heads
        groups = config.num_query_groups or heads
        width = config.kv_channels or config.hidden_size // heads
        ffn = config.ffn_hidden_size or 4 * config.hidden_size
        size = next(model.parameters()).element_size()
        cache_position = 2 * groups * width // tp * layers * size
        activations = 4 * config.hidden_size + (heads + 2 * groups) * width // tp
        activations += (3 if config.gated_linear_unit else 2) * ffn // tp
        position = activations * size + cache_position
        return cls(position, cache_position, plain_position=position + heads // tp * window * 4)


def usable_memory(device: torch.device) -> int | None:
    """MEMORY_SHARE of the memory free for this process on `device`: free on the device, plus what PyTorch's
    allocator holds but does not use (training's activations, freed after the step). None on CPU, where the
    engine keeps its configured sizes."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(MEMORY_SHARE * (free + unused))


def fitted(configured: Sizes, footprint: Footprint, memory: int | None, least: int) -> Sizes:
    """`configured` shrunk to fit `memory` bytes (None: as configured): half of what is left after RESERVED
    for a pass at most, the rest for a cache. No size goes under `least` positions (a tree of the planner's
    rows), which is logged when the memory is smaller than that needs."""
    if memory is None:
        return configured
    room = memory - RESERVED
    position, cache_position = max(footprint.position, 1), max(footprint.cache_position, 1)
    passes = max(min(configured.pass_positions, room // 2 // position), least)
    cache = max(min(configured.cache_positions, (room - passes * position) // cache_position), least)
    plain = max(min(configured.plain_positions, room // max(footprint.plain_position, 1)), least)
    if room < least * (footprint.position + footprint.cache_position):
        logger.warning(
            "the evaluation has %.2f GiB on this device, less than its smallest passes need (%.2f GiB): it may run "
            "out of memory. Fix: lower engine.max_sequence_length, or free memory (e.g. the async placement on "
            "a device of its own)",
            memory / 2**30,
            (RESERVED + least * (footprint.position + footprint.cache_position)) / 2**30,
        )
    return Sizes(int(passes), int(cache), int(plain))
