"""The scoring engine on a real Megatron GPTModel: batching, packing and caching never change a result."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_gpt, tiny_llama

import megatron_eval_hook.engine.attention as attention_module
import megatron_eval_hook.engine.core as engine_core
from megatron_eval_hook.engine import (
    CPU_PASS_POSITIONS,
    END_OF_TEXT,
    LENGTH,
    STOP,
    Engine,
    GenerationRequest,
    RequestTooLong,
)
from megatron_eval_hook.engine.attention import tree_batches
from megatron_eval_hook.engine.plan import _PackedRow

# Requests sharing prefixes, as multiple-choice questions do, plus a duplicate and a lone token.
SEQUENCES = [
    [5, 6, 7, 8, 9, 10],
    [5, 6, 7, 8, 11, 12, 13],
    [5, 6, 7, 14],
    [11, 12],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [5, 6, 7, 8, 9, 10],
    [13],
]


def reference_logprobs(model, tokens: list[int], vocab_size: int) -> torch.Tensor:
    """log p(t_i | t_<i) from one unbatched forward pass, computed independently of the engine."""
    ids = torch.tensor([tokens])
    n = len(tokens)
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1).view(1, 1, n, n)
    with torch.no_grad():
        logits = model(ids, torch.arange(n).unsqueeze(0), mask)[0, :, :vocab_size]
    return torch.log_softmax(logits.float(), -1)


def _spell_count(tokens: list[int]) -> str:
    """A `decode` whose text says how many tokens there are ("x" each): a stop sequence "xx" stops at two."""
    return "x" * len(tokens)


def engine(model, vocab, fast=True, batch_size=3, **kwargs):
    return Engine(model, vocab_size=vocab, max_sequence_length=64, batch_size=batch_size, fast=fast, **kwargs)


@pytest.fixture(params=["gpt2", "grouped-query", "llama"])
def model(request, megatron_world, char_tokenizer):
    if request.param == "gpt2":
        return tiny_gpt(char_tokenizer.vocab_size, init_method_std=0.5)
    if request.param == "llama":
        return tiny_llama(char_tokenizer.vocab_size)
    return tiny_gpt(char_tokenizer.vocab_size, num_query_groups=2, init_method_std=0.5)


@pytest.mark.parametrize("fast", [True, False], ids=["packed", "plain"])
def test_score_matches_an_unbatched_forward_pass(model, char_tokenizer, fast):
    vocab = char_tokenizer.vocab_size
    subject = engine(model, vocab, fast)
    assert (subject.plain_reason is None) == fast
    scores = subject.score(SEQUENCES)
    for tokens, got in zip(SEQUENCES, scores):
        expected = reference_logprobs(model, tokens, vocab)
        assert got[0] == 0.0
        want = [float(expected[i - 1, tokens[i]]) for i in range(1, len(tokens))]
        assert torch.allclose(torch.tensor(got[1:]), torch.tensor(want), atol=1e-5)


def test_shared_prefixes_take_one_position_each(gpt, char_tokenizer):
    subject = engine(gpt, char_tokenizer.vocab_size)
    rows = subject.planner.pack(SEQUENCES)
    distinct_prefixes = {tuple(s[: i + 1]) for s in SEQUENCES for i in range(len(s))}
    assert sum(len(r.tokens) for r in rows) == len(distinct_prefixes) == 24


@pytest.mark.parametrize("fast", [True, False], ids=["packed", "plain"])
def test_only_the_needed_tokens_are_scored(model, char_tokenizer, fast):
    vocab = char_tokenizer.vocab_size
    full = engine(model, vocab, fast).score(SEQUENCES)
    starts = [4, 5, 2, 1, 10, 0, 1]
    partial = engine(model, vocab, fast).score(SEQUENCES, needed_from=starts)
    for sequence, start, all_tokens, some in zip(SEQUENCES, starts, full, partial):
        # the duplicate of SEQUENCES[0] asks for everything: both copies get it
        start = 0 if sequence == SEQUENCES[0] else start
        assert some[max(start, 1) :] == pytest.approx(all_tokens[max(start, 1) :], abs=1e-5)
        assert all(v == 0.0 for v in some[: max(start, 1)])


@pytest.mark.parametrize("fast", [True, False], ids=["cached", "plain"])
def test_generation_is_greedy_and_independent_of_batch_size(model, char_tokenizer, fast):
    vocab = char_tokenizer.vocab_size
    requests = [
        GenerationRequest([5, 6, 7], 6),
        GenerationRequest([9], 4),
        GenerationRequest([1, 2, 3, 4, 5, 6], 5),
        GenerationRequest([1, 2], 9, stop_sequences=("xx",)),  # stops at its second token (`_spell_count`)
        GenerationRequest([5, 6, 8, 9], 5),  # shares a prefix with the first
        GenerationRequest([20, 21, 22], 1),  # ends after its first token
        GenerationRequest([30, 31], 2),
    ]
    batched = engine(model, vocab, fast, batch_size=8, decode=_spell_count).generate(requests)
    single = engine(model, vocab, fast, batch_size=1, decode=_spell_count).generate(requests)
    assert [g.tokens for g in batched] == [g.tokens for g in single]
    for b, s in zip(batched, single):  # batch shapes change float rounding only
        assert torch.allclose(torch.tensor(b.logprobs), torch.tensor(s.logprobs), atol=1e-5)
    for request, generation in zip(requests, batched):
        tokens = list(request.prompt)
        for token, logprob in zip(generation.tokens, generation.logprobs):
            # each generated token is the argmax given what precedes it
            expected = reference_logprobs(model, tokens, vocab)[-1]
            assert int(expected.argmax()) == token
            assert logprob == pytest.approx(float(expected[token]), abs=1e-5)
            tokens.append(token)
        if not request.stop_sequences:
            assert generation.finish_reason == LENGTH
            assert len(generation.tokens) == request.max_new_tokens
        else:
            assert generation.finish_reason == STOP and len(generation.tokens) == 2


def test_cached_generation_over_many_packed_rows_matches_the_plain_path(model, char_tokenizer):
    vocab = char_tokenizer.vocab_size
    # short rows: the prompts spread over several rows, and rows whose requests all ended leave the batch
    requests = [GenerationRequest([i % 70, (7 * i) % 70, 3, 4], 2 if i % 5 else 12) for i in range(30)]
    cached = engine(model, vocab, batch_size=30, row_tokens=4).generate(requests)
    plain = engine(model, vocab, fast=False, batch_size=30).generate(requests)
    assert [g.tokens for g in cached] == [g.tokens for g in plain]
    for c, p in zip(cached, plain):
        assert c.logprobs == pytest.approx(p.logprobs, abs=1e-5)


def test_prompts_sharing_a_trunk_generate_as_they_would_alone(model, char_tokenizer):
    vocab = char_tokenizer.vocab_size
    trunk = [(5 * i) % 60 + 1 for i in range(40)]  # the in-context examples every prompt starts with
    requests = [GenerationRequest(trunk + [i % 60, (3 * i) % 60][: 1 + i % 2], 3 + i % 4) for i in range(12)]
    requests.append(GenerationRequest(trunk[:30], 3))  # the shortest prompt bounds the trunk
    cached = engine(model, vocab, batch_size=13, row_tokens=4).generate(requests)
    plain = engine(model, vocab, fast=False, batch_size=1).generate(requests)
    assert [g.tokens for g in cached] == [g.tokens for g in plain]
    for c, p in zip(cached, plain):
        assert c.logprobs == pytest.approx(p.logprobs, abs=1e-5)


ROTARY_VARIANTS = {
    "half-rotary": dict(model=dict(rotary_percent=0.5)),
    "interleaved": dict(rotary_interleaved=True),
    "interpolated": dict(model=dict(seq_len_interpolation_factor=2.0, rotary_base=500)),
    "llama3-scaling": dict(model=dict(rope_scaling=True, rope_scaling_factor=8.0)),
    "qk-layernorm": dict(qk_layernorm=True),
}


@pytest.mark.parametrize("variant", list(ROTARY_VARIANTS))
def test_rotary_variants_take_the_fast_path_with_megatrons_own_angles(megatron_world, char_tokenizer, variant):
    """Megatron's rotary options (the part of each head rotated, the channel layout, the base, position
    interpolation, Llama 3 scaling) and normalized queries and keys: the fast path rotates as Megatron's own
    attention does."""
    vocab = char_tokenizer.vocab_size
    rotary = tiny_llama(vocab, **ROTARY_VARIANTS[variant])
    subject = engine(rotary, vocab, decode=_spell_count)
    assert subject.plain_reason is None
    plain = engine(rotary, vocab, fast=False, decode=_spell_count)
    for got, expected in zip(subject.score(SEQUENCES), plain.score(SEQUENCES)):
        assert got == pytest.approx(expected, abs=1e-5)
    requests = [GenerationRequest([5, 6, 7], 6), GenerationRequest([5, 6, 8, 9], 5), GenerationRequest([9], 4)]
    fast_generations, plain_generations = subject.generate(requests), plain.generate(requests)
    assert [g.tokens for g in fast_generations] == [g.tokens for g in plain_generations]
    for got, expected in zip(fast_generations, plain_generations):
        assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-5)


def test_rotary_angles_at_packed_positions_instead_of_tree_depths_change_the_scores(
    megatron_world, char_tokenizer, monkeypatch
):
    """The check above catches a real mistake: rotating each token at its place in the packed pass rather
    than at its depth in its tree (its position in its own sequence)."""
    vocab = char_tokenizer.vocab_size
    rotary = tiny_llama(vocab)
    expected = engine(rotary, vocab, fast=False).score(SEQUENCES)
    rotation = Engine._rotation
    monkeypatch.setattr(Engine, "_rotation", lambda self, p: rotation(self, torch.arange(p.numel()).view_as(p)))
    mutant = engine(rotary, vocab).score(SEQUENCES)
    worst = max(abs(a - b) for got, want in zip(mutant, expected) for a, b in zip(got, want))
    assert worst > 1e-2


def test_on_layers_the_tests_cannot_run_the_fast_path_is_checked_before_it_serves(
    megatron_world, char_tokenizer, monkeypatch, caplog
):
    """Transformer Engine's layers exist on GPU only: there the engine's first call checks its fast path against
    the model's own forward pass, keeps it when they agree and takes the plain path, saying why, when not. Here
    the local layers stand in for them, and a rotary mistake for a layer the fast path mishandles."""
    vocab = char_tokenizer.vocab_size
    model = tiny_llama(vocab)
    assert engine_core.unverified_layers(model) == []  # Megatron's local layers: the test suite runs them
    monkeypatch.setattr(engine_core, "unverified_layers", lambda model: ["DotProductAttention"])
    monkeypatch.setattr(engine_core, "_said", set())
    expected = engine(model, vocab, fast=False).score(SEQUENCES)
    checked = engine(model, vocab)
    with caplog.at_level(logging.INFO, logger=engine_core.__name__):
        scores = checked.score(SEQUENCES)
    assert checked.plain_reason is None
    assert "the fast path agrees with the model's own forward pass on DotProductAttention" in caplog.text
    rotation = Engine._rotation
    monkeypatch.setattr(Engine, "_rotation", lambda self, p: rotation(self, torch.arange(p.numel()).view_as(p)))
    mutant = engine(model, vocab)
    with caplog.at_level(logging.INFO, logger=engine_core.__name__):
        caught = mutant.generate([GenerationRequest([5, 6, 7], 4)])  # checked at a generation call too
    assert "on layers DotProductAttention the fast path's log-probabilities differ" in mutant.plain_reason
    assert "the model takes the plain path" in caplog.text and mutant.plain_reason in caplog.text
    plain = engine(model, vocab, fast=False)
    assert [g.tokens for g in caught] == [g.tokens for g in plain.generate([GenerationRequest([5, 6, 7], 4)])]
    for got, other, want in zip(scores, mutant.score(SEQUENCES), expected):
        assert got == pytest.approx(want, abs=1e-5) and other == pytest.approx(want, abs=1e-5)


def test_a_model_the_fast_path_cannot_take_is_said_once(megatron_world, char_tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(engine_core, "_said", set())
    model = tiny_gpt(char_tokenizer.vocab_size, position_embedding_type="none")
    with caplog.at_level(logging.WARNING, logger=engine_core.__name__):
        for _ in range(3):  # an engine per save
            engine(model, char_tokenizer.vocab_size)
    assert caplog.text.count("the model takes the plain path") == 1
    assert "position_embedding_type='none'" in caplog.text


def test_the_model_keeps_its_own_attention_and_matmuls_after_a_call(model, char_tokenizer):
    before = [type(m.self_attention.core_attention) for m in model.decoder.layers]
    positions = model.position_embedding_type
    subject = engine(model, char_tokenizer.vocab_size)
    subject.score(SEQUENCES)
    subject.generate([GenerationRequest([5, 6], 3)])
    assert [type(m.self_attention.core_attention) for m in model.decoder.layers] == before
    assert model.position_embedding_type == positions  # rotary: Megatron applies its own again
    assert not [name for name, m in model.named_modules() if {"_forward_impl", "forward"} & set(vars(m))]


@pytest.mark.parametrize("fast", [True, False], ids=["packed", "plain"])
def test_on_cpu_every_linear_layer_runs_through_onednn(gpt, char_tokenizer, fast):
    subject = engine(gpt, char_tokenizer.vocab_size, fast)
    assert subject.linear is not None  # the pinned CPU torch has oneDNN
    inner, shapes = subject.linear, []

    def linear(input, weight, bias=None, gelu=None):
        shapes.append((tuple(weight.shape), gelu))
        return inner(input, weight, bias, gelu=gelu)

    subject.linear = linear
    subject.score([[5, 6, 7]])
    linears = [m for m in gpt.modules() if type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear")]
    weights = [gpt.shared_embedding_or_output_weight() if m.weight is None else m.weight for m in linears]
    # every layer's four matmuls (qkv, attention out, mlp in, mlp out) and the output layer, once each; the
    # MLP's first with its bias and GELU
    assert sorted(shape for shape, _ in shapes) == sorted(tuple(w.shape) for w in weights)
    fc1 = [tuple(layer.mlp.linear_fc1.weight.shape) for layer in gpt.decoder.layers]
    assert sorted(shape for shape, gelu in shapes if gelu == "erf") == sorted(fc1)


@pytest.mark.parametrize("fusion", [False, True], ids=["gelu", "bias-gelu-fusion"])
def test_a_gelu_mlp_gives_the_same_output_with_bias_and_activation_in_its_matmul(
    megatron_world, char_tokenizer, fusion
):
    # Megatron's bias-GELU fusion computes the tanh approximation, torch's gelu the exact one: each is kept
    model = tiny_gpt(char_tokenizer.vocab_size, init_method_std=0.5, bias_activation_fusion=fusion)
    torch.nn.init.normal_(model.decoder.layers[0].mlp.linear_fc1.bias, std=0.5)
    mlp = model.decoder.layers[0].mlp
    hidden = torch.randn(7, 2, 32) * 3
    with torch.no_grad():
        expected, expected_bias = mlp(hidden)
        subject = engine(model, char_tokenizer.vocab_size)
        with subject._fast_linears():
            assert "forward" in vars(mlp)
            got, got_bias = mlp(hidden)
    assert "forward" not in vars(mlp)
    assert torch.equal(got_bias, expected_bias)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fast", [True, False], ids=["packed", "plain"])
def test_the_output_layer_in_slices_of_rows_gives_the_same_results(model, char_tokenizer, fast):
    vocab = char_tokenizer.vocab_size
    whole = engine(model, vocab, fast, batch_size=8)
    assert whole.backend.output_rows > 100  # a tiny vocabulary: every pass's rows at once
    requests = [GenerationRequest([i + 1, (7 * i) % 60 + 1, 3], 4) for i in range(6)]
    expected_scores, expected_generations = whole.score(SEQUENCES), whole.generate(requests)
    for rows in (1, 3):
        sliced = engine(model, vocab, fast, batch_size=8)
        sliced.backend.output_rows = rows  # the answers of one question land in different slices
        for got, expected in zip(sliced.score(SEQUENCES), expected_scores):
            assert got == pytest.approx(expected, abs=1e-5)
        generations = sliced.generate(requests)
        assert [g.tokens for g in generations] == [g.tokens for g in expected_generations]
        for got, expected in zip(generations, expected_generations):
            assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-5)


def test_weights_changed_between_calls_are_used(gpt, char_tokenizer):
    vocab = char_tokenizer.vocab_size
    subject = engine(gpt, vocab)
    before = subject.score(SEQUENCES)
    qkv = gpt.decoder.layers[0].self_attention.linear_qkv.weight
    original = qkv.detach().clone()
    try:
        with torch.no_grad():
            qkv.mul_(1.5)  # in place, as an optimizer step or a snapshot load writes weights
        changed = subject.score(SEQUENCES)
        assert changed == engine(gpt, vocab).score(SEQUENCES) != before
    finally:
        with torch.no_grad():
            qkv.copy_(original)
    assert subject.score(SEQUENCES) == before
    subject.release()
    assert subject.score(SEQUENCES) == before


@pytest.mark.parametrize("fast", [True, False], ids=["cached", "plain"])
def test_padded_vocabulary_rows_are_never_predicted(gpt, char_tokenizer, fast):
    vocab = char_tokenizer.vocab_size
    weight = gpt.output_layer.weight
    with torch.no_grad():  # real rows score 0; one of the two padding rows scores far above
        weight[:vocab] = 0
        weight[vocab] = 100.0
        weight[vocab + 1] = -100.0
    prompt = [3, 4, 5]
    full = reference_logprobs(gpt, prompt, weight.shape[0])[-1]
    assert int(full.argmax()) >= vocab  # the unrestricted output layer would predict padding
    generation = engine(gpt, vocab, fast, batch_size=2).generate([GenerationRequest(prompt, 3)])[0]
    assert all(t < vocab for t in generation.tokens)


@pytest.mark.parametrize("fast", [True, False], ids=["cached", "plain"])
def test_generation_stops_at_end_of_text(gpt, char_tokenizer, fast):
    vocab = char_tokenizer.vocab_size
    first = engine(gpt, vocab, fast).generate([GenerationRequest([5, 6], 1)])[0].tokens[0]
    ended = Engine(gpt, vocab_size=vocab, max_sequence_length=64, batch_size=2, end_of_text=first, fast=fast)
    result = ended.generate([GenerationRequest([5, 6], 10), GenerationRequest([7, 8, 9], 10)])
    assert result[0].finish_reason == END_OF_TEXT and result[0].tokens == []


def test_a_scoring_request_longer_than_the_window_is_refused(gpt, char_tokenizer):
    subject = Engine(gpt, vocab_size=char_tokenizer.vocab_size, max_sequence_length=8, batch_size=2)
    with pytest.raises(RequestTooLong, match="9 tokens.*8 tokens"):
        subject.score([list(range(9))])


@pytest.mark.parametrize("padded", [False, True], ids=["tree-by-tree", "padded-batch"])
def test_both_layouts_of_tree_attention_match_the_plain_path(model, char_tokenizer, padded):
    vocab = char_tokenizer.vocab_size
    subject = engine(model, vocab, batch_size=4, row_tokens=8, padded_trees=padded)
    # trees of different sizes in one pass: the padded batch masks the shorter ones' padding
    for got, want in zip(subject.score(SEQUENCES), engine(model, vocab, fast=False).score(SEQUENCES)):
        assert got == pytest.approx(want, abs=1e-4)
    trunk = [(5 * i) % 60 + 1 for i in range(20)]  # prompt parts after a trunk, in several prefill passes
    requests = [GenerationRequest(trunk + [i % 60, (3 * i) % 60, 7][: 1 + i % 3], 2 + i % 4) for i in range(12)]
    cached = subject.generate(requests)
    plain = engine(model, vocab, fast=False, batch_size=1).generate(requests)
    assert [g.tokens for g in cached] == [g.tokens for g in plain]
    for c, p in zip(cached, plain):  # large weights (std 0.5): rounding reaches 1e-5
        assert c.logprobs == pytest.approx(p.logprobs, abs=1e-4)


def test_padded_tree_batches_group_trees_of_similar_sizes(gpt, char_tokenizer, monkeypatch):
    subject = engine(gpt, char_tokenizer.vocab_size, padded_trees=True)
    rows = []
    for n in (3, 40, 12, 20, 3):  # one chain of n nodes each
        rows.append(_PackedRow())
        for node in range(n):
            rows[-1].add(node + 1, node - 1)
    offsets = list(itertools.accumulate((len(row.tokens) for row in rows[:-1]), initial=0))
    batches, scatter = tree_batches(rows, offsets, 5, subject.model.config, torch.float32, torch.device("cpu"))
    # a tree under half its batch's first starts the next batch: 40 and 20, then 12, then 3 and 3
    assert [tuple(b.gather.shape) for b in batches] == [(2, 40), (1, 12), (2, 3)]
    assert [tuple(b.bias.shape) for b in batches] == [(2, 1, 40, 45), (1, 1, 12, 17), (2, 1, 3, 8)]
    # every pass position is gathered once and its output read back from there
    placed = torch.cat([b.gather.flatten() for b in batches])
    assert placed[scatter].tolist() == list(range(sum(len(row.tokens) for row in rows)))
    # a memory bound that holds one 40-node tree's keys, values and bias: the 20-node tree goes apart, with
    # the 12-node one (two trees of 20 fit)
    config = gpt.config
    per_tree = (5 + 40) * (2 * config.num_query_groups * config.kv_channels + 40) * 4
    monkeypatch.setattr(attention_module, "PADDED_BATCH_BYTES", per_tree)
    batches, _ = tree_batches(rows, offsets, 5, subject.model.config, torch.float32, torch.device("cpu"))
    assert [tuple(b.gather.shape) for b in batches] == [(1, 40), (2, 20), (2, 3)]


def test_generation_in_several_groups_and_prefill_passes_matches_the_plain_path(model, char_tokenizer):
    vocab = char_tokenizer.vocab_size
    # one row per prompt (row_tokens=4) and a cache budget of 4 x 2 x 4 = 32 positions: each group holds
    # several requests, so its prompts take more rows than one forward pass (batch_size=2) computes
    requests = [GenerationRequest([(3 * i) % 50 + 1, (5 * i) % 50 + 1, i % 7 + 1], 1 + i % 3) for i in range(14)]
    subject = engine(model, vocab, batch_size=2, row_tokens=4)
    prompts = [r.prompt for r in requests]
    groups = subject.planner.decoding_groups(
        sorted(range(len(prompts)), key=lambda i: prompts[i]), prompts, [r.max_new_tokens for r in requests]
    )
    assert len(groups) > 1 and max(len(g) for g in groups) > 2
    cached = subject.generate(requests)
    plain = engine(model, vocab, fast=False, batch_size=1).generate(requests)
    assert [g.tokens for g in cached] == [g.tokens for g in plain]
    for c, p in zip(cached, plain):
        assert c.logprobs == pytest.approx(p.logprobs, abs=1e-5)


def test_a_forward_pass_holds_at_most_batch_size_row_tokens_positions(gpt, char_tokenizer):
    assert engine(gpt, char_tokenizer.vocab_size, batch_size=16).pass_positions == CPU_PASS_POSITIONS < 16 * 256
    subject = engine(gpt, char_tokenizer.vocab_size, batch_size=4, row_tokens=8)
    # trees larger than a pass (one long request each) next to ordinary ones, largest first
    rows = subject.planner.pack([[i] * n for i, n in enumerate([40, 20, 20, 12, 3, 3, 3, 3, 3, 3, 3], start=1)])
    batches = list(subject.planner.passes(rows))
    assert sum(len(b) for b in batches) == len(rows)
    for batch in batches:
        assert len(batch) == 1 or sum(len(row.tokens) for row in batch) <= 4 * 8
    # 105 positions in four passes: the 40-token tree alone, the others each into the emptiest pass
    assert sorted(sum(len(row.tokens) for row in b) for b in batches) == [23, 24, 26, 40]


def test_each_prefix_tree_is_a_row_of_its_own(gpt, char_tokenizer):
    subject = engine(gpt, char_tokenizer.vocab_size, batch_size=4, row_tokens=8)
    sequences = [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6], [3, 4, 5], [3, 4, 6], [4, 5, 6]]
    rows = subject.planner.pack(sequences)
    assert sorted(len(r.tokens) for r in rows) == [3, 4, 5, 5]
    for row in rows:
        for k, path in row.paths.items():
            assert [row.tokens[node] for node in path] == sequences[k]


@contextmanager
def positions_fed(model) -> Iterator[list[int]]:
    """The number of positions of each forward pass, counted at the token embedding."""
    fed: list[int] = []
    handle = model.embedding.word_embeddings.register_forward_hook(lambda _m, inputs, _o: fed.append(inputs[0].numel()))
    try:
        yield fed
    finally:
        handle.remove()


def test_scoring_computes_each_needed_prefix_once_and_no_padding(gpt, char_tokenizer):
    with positions_fed(gpt) as fed:
        engine(gpt, char_tokenizer.vocab_size, batch_size=2, row_tokens=4).score(SEQUENCES)
    # a sequence's last token is read as a target, never fed: its logits would predict nothing
    assert sum(fed) == len({tuple(s[:i]) for s in SEQUENCES for i in range(1, len(s))})


def test_decoding_groups_sharing_a_trunk_compute_it_once(gpt, char_tokenizer):
    vocab = char_tokenizer.vocab_size
    trunk = [(7 * i) % 60 + 1 for i in range(30)]
    requests = [GenerationRequest(trunk + [i + 1, 60 - i], 2) for i in range(12)]
    # a cache of 8 x 2 x 4 = 64 positions holds the trunk and 8 requests of 2 + 2 positions: two groups
    subject = engine(gpt, vocab, batch_size=2, row_tokens=4)
    prompts = [r.prompt for r in requests]
    assert (
        len(
            subject.planner.decoding_groups(
                sorted(range(12), key=lambda i: prompts[i]), prompts, [r.max_new_tokens for r in requests]
            )
        )
        == 2
    )
    with positions_fed(gpt) as fed:
        cached = subject.generate(requests)
    # the trunk once, each prompt's own two tokens, then one step feeding each request's first new token
    assert sum(fed) == 30 + 12 * 2 + 12
    plain = engine(gpt, vocab, fast=False, batch_size=1).generate(requests)
    assert [g.tokens for g in cached] == [g.tokens for g in plain]
    for c, p in zip(cached, plain):
        assert c.logprobs == pytest.approx(p.logprobs, abs=1e-5)


def test_a_prefix_tree_wider_than_a_row_stays_whole_when_that_costs_less(gpt, char_tokenizer):
    subject = engine(gpt, char_tokenizer.vocab_size, batch_size=4, row_tokens=8)
    context = list(range(1, 11))  # four answers to one 10-token question: 14 positions, not 4 x 11
    rows = subject.planner.pack([context + [20 + i] for i in range(4)])
    assert [len(r.tokens) for r in rows] == [14]


def test_a_prompt_sharing_part_of_the_trunk_is_decoded_apart(model, char_tokenizer):
    vocab = char_tokenizer.vocab_size
    trunk = [(5 * i) % 50 + 10 for i in range(48)]  # the in-context examples
    requests = [GenerationRequest(trunk + [i + 1, (3 * i) % 50 + 1], 3) for i in range(11)]
    # two prompts that kept only the first 8 tokens (HELM dropped examples to fit them), sorting before
    # and after the others: in one group they would cut everyone's trunk to 8 tokens
    requests += [GenerationRequest(trunk[:8] + [1, 2, 3], 3), GenerationRequest(trunk[:8] + [70, 2], 3)]
    subject = engine(model, vocab, batch_size=16, row_tokens=8)
    prompts = [r.prompt for r in requests]
    groups = subject.planner.decoding_groups(
        sorted(range(len(prompts)), key=lambda i: prompts[i]), prompts, [r.max_new_tokens for r in requests]
    )
    assert sorted(sorted(g) for g in groups) == [list(range(11)), [11], [12]]
    with positions_fed(model) as fed:
        cached = subject.generate(requests)
    # each group's trunk computes only what the group before it did not: trunk[:8] + [1, 2], then
    # trunk[8:], then [70]; each prompt's own part; two steps feeding each request's latest token
    assert sum(fed) == 10 + 40 + 1 + (1 + 11 * 2 + 1) + 13 * 2
    plain = engine(model, vocab, fast=False, batch_size=1).generate(requests)
    assert [g.tokens for g in cached] == [g.tokens for g in plain]
    for c, p in zip(cached, plain):
        assert c.logprobs == pytest.approx(p.logprobs, abs=1e-5)


# Measured on the Llama-style test model (log-probabilities of about -5): the largest difference from the
# float32 model's, fast path 0.124 in bf16 and 0.025 in fp16 (the plain path: 0.130 and 0.019).
HALF_PRECISION_BOUNDS = {torch.bfloat16: 0.25, torch.float16: 0.05}


@pytest.mark.parametrize("dtype", list(HALF_PRECISION_BOUNDS), ids=["bf16", "fp16"])
def test_half_precision_weights_score_within_their_rounding_of_float32(megatron_world, char_tokenizer, dtype):
    vocab = char_tokenizer.vocab_size
    sequences = [[(3 * i + j) % 60 + 1 for j in range(5 + i % 17)] for i in range(30)]
    reference = engine(tiny_llama(vocab), vocab, batch_size=4).score(sequences)
    half = tiny_llama(vocab).to(dtype)
    fast, plain = engine(half, vocab, batch_size=4), engine(half, vocab, fast=False, batch_size=4)
    assert fast.plain_reason is None
    bound = HALF_PRECISION_BOUNDS[dtype]
    for got, other, want in zip(fast.score(sequences), plain.score(sequences), reference):
        assert got == pytest.approx(want, abs=bound)
        assert got == pytest.approx(other, abs=bound)
    generations = fast.generate([GenerationRequest([5, 6, 7], 6), GenerationRequest([9], 4)])
    assert [len(g.tokens) for g in generations] == [6, 4]
    assert all(isinstance(value, float) for g in generations for value in g.logprobs)
