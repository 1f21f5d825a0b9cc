"""The scoring engine on a real Megatron GPTModel: batching never changes a result."""

from __future__ import annotations

import torch

from megatron_eval_hook.engine import END_OF_TEXT, LENGTH, STOP, Engine, GenerationRequest, RequestTooLong


def reference_logprobs(model, tokens: list[int], vocab_size: int) -> torch.Tensor:
    """log p(t_i | t_<i) from one unbatched forward pass, computed independently of the engine."""
    ids = torch.tensor([tokens])
    n = len(tokens)
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1).view(1, 1, n, n)
    with torch.no_grad():
        logits = model(ids, torch.arange(n).unsqueeze(0), mask)[0, :, :vocab_size]
    return torch.log_softmax(logits.float(), -1)


def test_score_matches_an_unbatched_forward_pass(gpt, char_tokenizer):
    vocab = char_tokenizer.vocab_size
    sequences = [[5, 6, 7, 8, 9, 10], [11, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [13]]
    scores = Engine(gpt, vocab_size=vocab, max_sequence_length=64, batch_size=3).score(sequences)
    for tokens, got in zip(sequences, scores):
        expected = reference_logprobs(gpt, tokens, vocab)
        assert got[0] == 0.0
        want = [float(expected[i - 1, tokens[i]]) for i in range(1, len(tokens))]
        assert torch.allclose(torch.tensor(got[1:]), torch.tensor(want), atol=1e-5)


def test_generation_is_greedy_and_independent_of_batch_size(gpt, char_tokenizer):
    vocab = char_tokenizer.vocab_size
    requests = [GenerationRequest([5, 6, 7], 6), GenerationRequest([9], 4), GenerationRequest([1, 2, 3, 4, 5, 6], 5)]
    batched = Engine(gpt, vocab_size=vocab, max_sequence_length=64, batch_size=8).generate(requests)
    single = Engine(gpt, vocab_size=vocab, max_sequence_length=64, batch_size=1).generate(requests)
    assert [g.tokens for g in batched] == [g.tokens for g in single]
    for b, s in zip(batched, single):  # batch shapes change float rounding only
        assert torch.allclose(torch.tensor(b.logprobs), torch.tensor(s.logprobs), atol=1e-5)
    for request, generation in zip(requests, batched):
        tokens = list(request.prompt)
        for token in generation.tokens:  # each generated token is the argmax given what precedes it
            assert int(reference_logprobs(gpt, tokens, vocab)[-1].argmax()) == token
            tokens.append(token)
        assert generation.finish_reason == LENGTH
        assert len(generation.tokens) == request.max_new_tokens


def test_padded_vocabulary_rows_are_never_predicted(gpt, char_tokenizer):
    vocab = char_tokenizer.vocab_size
    weight = gpt.output_layer.weight
    with torch.no_grad():  # real rows score 0; one of the two padding rows scores far above
        weight[:vocab] = 0
        weight[vocab] = 100.0
        weight[vocab + 1] = -100.0
    prompt = [3, 4, 5]
    full = reference_logprobs(gpt, prompt, weight.shape[0])[-1]
    assert int(full.argmax()) >= vocab  # the unrestricted output layer would predict padding
    engine = Engine(gpt, vocab_size=vocab, max_sequence_length=64, batch_size=2)
    generation = engine.generate([GenerationRequest(prompt, 3)])[0]
    assert all(t < vocab for t in generation.tokens)


def test_generation_stops_when_told_and_at_end_of_text(gpt, char_tokenizer):
    vocab = char_tokenizer.vocab_size
    engine = Engine(gpt, vocab_size=vocab, max_sequence_length=64, batch_size=2)
    stopped = engine.generate([GenerationRequest([5, 6], 10, is_done=lambda tokens: len(tokens) == 2)])[0]
    assert stopped.finish_reason == STOP and len(stopped.tokens) == 2
    first = engine.generate([GenerationRequest([5, 6], 1)])[0].tokens[0]
    ended = Engine(gpt, vocab_size=vocab, max_sequence_length=64, batch_size=2, end_of_text=first)
    result = ended.generate([GenerationRequest([5, 6], 10)])[0]
    assert result.finish_reason == END_OF_TEXT and result.tokens == []


def test_a_scoring_request_longer_than_the_window_is_refused(gpt, char_tokenizer):
    engine = Engine(gpt, vocab_size=char_tokenizer.vocab_size, max_sequence_length=8, batch_size=2)
    try:
        engine.score([list(range(9))])
    except RequestTooLong as error:
        assert "9 tokens" in str(error) and "8 tokens" in str(error)
    else:
        raise AssertionError("expected RequestTooLong")
