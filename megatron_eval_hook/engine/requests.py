"""What the engine is asked and what it answers: plain data (token ids, stop sequences as text), which
the sharded engine sends between ranks as it is."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class GenerationRequest:
    """Greedy continuation of `prompt` for at most `max_new_tokens` tokens, ended early when the text of
    the tokens generated so far contains one of `stop_sequences` (the engine's `decode` gives that text)."""

    prompt: list[int]
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
