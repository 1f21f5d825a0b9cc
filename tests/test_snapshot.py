"""Snapshots in one process: a model's main-replica shards copied into a flat buffer and written into
another model (the multi-rank layouts are tested in the training loop, tests/test_async_placement.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt

from megatron_eval_hook.snapshot import ALIGNMENT, SharedBuffer, copy_into, extent, load_snapshot, main_replicas


@pytest.fixture
def models(megatron_world):
    return tiny_gpt(50, seed=1), tiny_gpt(50, seed=2)


def test_a_snapshot_carries_every_weight_into_another_model(models):
    source, target = models
    sources = main_replicas([source])
    shards = [shard for shard, _ in sources]
    assert all(shard.offset % ALIGNMENT == 0 for shard in shards)
    buffer = SharedBuffer(extent(shards))
    copy_into(buffer.tensor, sources)
    load_snapshot(target, shards, buffer.tensor)
    for (name, expected), (_, loaded) in zip(source.state_dict().items(), target.state_dict().items()):
        if isinstance(expected, torch.Tensor):
            assert torch.equal(expected, loaded), name
    buffer.close()


def test_a_snapshot_missing_a_tensor_is_refused(models):
    source, target = models
    sources = main_replicas([source])
    buffer = torch.empty(extent([shard for shard, _ in sources]), dtype=torch.uint8)
    copy_into(buffer, sources)
    with pytest.raises(ValueError, match="does not cover 1 tensor"):
        load_snapshot(target, [shard for shard, _ in sources[1:]], buffer)


def test_the_copy_is_a_copy_not_a_view(models):
    source, _ = models
    sources = main_replicas([source])
    buffer = torch.zeros(extent([shard for shard, _ in sources]), dtype=torch.uint8)
    copy_into(buffer, sources)
    before = buffer.clone()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(1.0)  # training goes on
    assert torch.equal(buffer, before)
