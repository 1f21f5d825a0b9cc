"""The engine sizes its passes and caches from the memory it is given: smaller passes, the same answers."""

from __future__ import annotations

import logging

import pytest
from conftest import tiny_gpt

from megatron_eval_hook.engine import Engine, GenerationRequest
from megatron_eval_hook.engine.memory import RESERVED, Footprint, Sizes, fitted

CONFIGURED = Sizes(pass_positions=4096, cache_positions=32768, plain_positions=16384)
FOOTPRINT = Footprint(position=100_000, cache_position=20_000, plain_position=200_000)


def test_without_a_limit_the_configured_sizes_stay():
    assert fitted(CONFIGURED, FOOTPRINT, None, least=256) == CONFIGURED
    assert fitted(CONFIGURED, FOOTPRINT, 1 << 50, least=256) == CONFIGURED  # never more than configured


def test_a_pass_and_a_cache_fit_the_memory_together():
    memory = RESERVED + 600 * FOOTPRINT.position
    sizes = fitted(CONFIGURED, FOOTPRINT, memory, least=256)
    assert sizes.pass_positions == 300  # half of what is left after the reserve
    assert sizes.cache_positions == 300 * FOOTPRINT.position // FOOTPRINT.cache_position  # the rest
    used = RESERVED + sizes.pass_positions * FOOTPRINT.position + sizes.cache_positions * FOOTPRINT.cache_position
    assert used <= memory
    assert sizes.plain_positions == 300  # a plain pass's positions also hold attention scores


def test_too_little_memory_keeps_the_smallest_sizes_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_eval_hook"):
        sizes = fitted(CONFIGURED, FOOTPRINT, RESERVED + 10 * FOOTPRINT.position, least=256)
    assert sizes == Sizes(256, 256, 256)
    assert "may run out of memory" in caplog.text and "engine.max_sequence_length" in caplog.text


def test_the_smallest_of_several_ranks_sizes():
    assert Sizes(5, 9, 7).smallest(Sizes(6, 3, 8), Sizes(9, 9, 2)) == Sizes(5, 3, 2)


def test_the_footprint_counts_this_ranks_layers_and_dtype(megatron_world, char_tokenizer):
    gpt = tiny_gpt(char_tokenizer.vocab_size, num_query_groups=2)
    config = gpt.config
    footprint = Footprint.of(gpt, window=64)
    assert footprint.cache_position == 2 * 2 * config.kv_channels * config.num_layers * 4  # float32 keys, values
    assert footprint.position > footprint.cache_position
    assert footprint.plain_position == footprint.position + config.num_attention_heads * 64 * 4


@pytest.mark.parametrize("fast", [True, False], ids=["packed", "plain"])
def test_an_engine_with_little_memory_gives_the_same_answers_in_smaller_passes(megatron_world, char_tokenizer, fast):
    vocab = char_tokenizer.vocab_size
    gpt = tiny_gpt(vocab, init_method_std=0.5)
    sequences = [[(3 * i + j) % 60 + 1 for j in range(5 + i % 7)] for i in range(24)]
    requests = [GenerationRequest([(5 * i) % 50 + 1, i % 9 + 1, 3], 1 + i % 4) for i in range(12)]
    kwargs = dict(vocab_size=vocab, max_sequence_length=64, batch_size=8, row_tokens=8, fast=fast)
    roomy = Engine(gpt, **kwargs)
    small = Engine(gpt, memory=RESERVED + 2 * 8 * Footprint.of(gpt, 64).position, **kwargs)
    assert small.sizes.pass_positions == 8 < roomy.sizes.pass_positions
    assert small.sizes.plain_positions < roomy.sizes.plain_positions
    for got, expected in zip(small.score(sequences), roomy.score(sequences), strict=True):
        assert got == pytest.approx(expected, abs=1e-5)
    small_generations, roomy_generations = small.generate(requests), roomy.generate(requests)
    assert [g.tokens for g in small_generations] == [g.tokens for g in roomy_generations]
    for got, expected in zip(small_generations, roomy_generations):
        assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
