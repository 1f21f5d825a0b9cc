"""Batched log-prob scoring and greedy generation on a Megatron `GPTModel`.

The engine knows token ids only: HELM's text, stop sequences and tokenizer live in `helm/client.py`.
Requests are sorted by length and run in batches of `batch_size` right-padded sequences; the
causal mask makes every real position independent of the padding after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# finish reasons, as HELM's clients report them
STOP, LENGTH, END_OF_TEXT = "stop", "length", "endoftext"


class RequestTooLong(ValueError):
    """A request does not fit in the model's context window."""


@dataclass(frozen=True)
class Generation:
    """Generated token ids, their log-probabilities (natural log) and why generation ended."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass
class GenerationRequest:
    """Greedy continuation of `prompt` for at most `max_new_tokens` tokens.

    `is_done(tokens)` is asked after each new token, with all tokens generated so far, and ends
    generation when it returns True (a stop sequence appeared).
    """

    prompt: list[int]
    max_new_tokens: int
    is_done: Callable[[list[int]], bool] | None = None


class Engine:
    """Evaluation forward passes on a (single-rank, TP=PP=1) Megatron `GPTModel`.

    `vocab_size` is the tokenizer's vocabulary: the model's padded vocabulary rows beyond it
    are never predicted. `max_sequence_length` is the context window, in tokens.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        vocab_size: int,
        max_sequence_length: int,
        batch_size: int,
        end_of_text: int | None = None,
    ):
        self.model = model
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.batch_size = batch_size
        self.end_of_text = end_of_text
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits over the real vocabulary at every position: [b, s] ids -> [b, s, vocab]."""
        batch, length = tokens.shape
        positions = torch.arange(length, device=self.device).unsqueeze(0).expand(batch, length)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=self.device), diagonal=1)
        logits = self.model(tokens, positions, causal.view(1, 1, length, length), runtime_gather_output=True)
        return logits[..., : self.vocab_size]

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices grouped into batches of similar length, longest first."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _padded(self, rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return batch.to(self.device)

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_i | tokens_<i) for every token of every sequence; the first token gets 0.0."""
        for sequence in sequences:
            if len(sequence) > self.max_sequence_length:
                raise RequestTooLong(
                    f"a scoring request of {len(sequence)} tokens exceeds the context window of "
                    f"{self.max_sequence_length} tokens"
                )
        results: list[list[float]] = [[] for _ in sequences]
        for batch in self._batches([len(s) for s in sequences]):
            width = max(len(sequences[i]) for i in batch)
            tokens = self._padded([sequences[i] for i in batch], width)
            logits = self._logits(tokens)[:, :-1]
            # log_softmax at the next token only: no second [b, s, vocab] tensor
            picked = logits.gather(-1, tokens[:, 1:, None]).squeeze(-1).float()
            logprobs = (picked - torch.logsumexp(logits.float(), dim=-1)).cpu()
            for row, i in enumerate(batch):
                n = len(sequences[i])
                results[i] = [0.0] + logprobs[row, : n - 1].tolist() if n else []
        return results

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Greedy generation for every request, batched; see `GenerationRequest`."""
        results: list[Generation | None] = [None] * len(requests)
        for request in requests:
            if request.max_new_tokens >= self.max_sequence_length:
                raise RequestTooLong(
                    f"max_tokens={request.max_new_tokens} leaves no room for a prompt in a context window "
                    f"of {self.max_sequence_length} tokens"
                )
        prompts = [self._fit_prompt(r) for r in requests]
        for batch in self._batches([len(p) for p in prompts]):
            for i, generation in zip(
                batch, self._generate_batch([prompts[i] for i in batch], [requests[i] for i in batch])
            ):
                results[i] = generation
        return [r for r in results if r is not None]

    def _fit_prompt(self, request: GenerationRequest) -> list[int]:
        # Keep the end of a prompt that would leave too little room (HELM normally fits it first).
        room = self.max_sequence_length - max(request.max_new_tokens, 0)
        return list(request.prompt[-room:]) if len(request.prompt) > room else list(request.prompt)

    def _generate_batch(self, prompts: list[list[int]], requests: list[GenerationRequest]) -> list[Generation]:
        lengths = [len(p) for p in prompts]
        budget = [max(r.max_new_tokens, 0) for r in requests]
        width = max(n + b for n, b in zip(lengths, budget))
        tokens = self._padded(prompts, width)
        generated: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        reasons: list[str | None] = [None if b > 0 else LENGTH for b in budget]
        while any(reason is None for reason in reasons):
            live = [i for i, reason in enumerate(reasons) if reason is None]
            current = max(lengths[i] for i in live)
            logits = self._logits(tokens[live, :current])
            last = torch.tensor([lengths[i] - 1 for i in live], device=self.device)
            next_logprobs = torch.log_softmax(logits[torch.arange(len(live), device=self.device), last].float(), -1)
            best_logprob, best = next_logprobs.max(dim=-1)
            for row, i in enumerate(live):
                token = int(best[row])
                if token == self.end_of_text:  # ends the text; not part of it
                    reasons[i] = END_OF_TEXT
                    continue
                generated[i].append(token)
                logprobs[i].append(float(best_logprob[row]))
                tokens[i, lengths[i]] = token
                lengths[i] += 1
                if requests[i].is_done is not None and requests[i].is_done(generated[i]):
                    reasons[i] = STOP
                elif len(generated[i]) >= budget[i]:
                    reasons[i] = LENGTH
        return [Generation(g, lp, str(r)) for g, lp, r in zip(generated, logprobs, reasons)]
