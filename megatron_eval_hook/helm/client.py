"""HELM `Client` and `Tokenizer` that answer in-process with the live training model.

HELM creates clients and tokenizers from import paths with plain-data arguments, so the live
model is handed over through a registry keyed by a string (`register_model`). Neither class
caches: a request cache keyed by the prompt would return an older checkpoint's answers.

`InProcessModel.prefetch` answers all requests of a HELM run in batched forward passes before
HELM asks for them one by one; `make_request` then only looks the answer up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from helm.clients.client import Client, truncate_sequence
from helm.common.request import ErrorFlags, GeneratedOutput, Request, RequestResult, Token
from helm.common.tokenization_request import (
    DecodeRequest,
    DecodeRequestResult,
    TokenizationRequest,
    TokenizationRequestResult,
    TokenizationToken,
)
from helm.tokenizers.tokenizer import Tokenizer

from megatron_eval_hook.engine import Engine, GenerationRequest, RequestTooLong


class TextTokenizer(Protocol):
    """The run's tokenizer, as the engine's client needs it."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...


class MegatronTokenizer:
    """A Megatron tokenizer (`megatron.training.get_tokenizer()`) as a `TextTokenizer`."""

    def __init__(self, tokenizer: object):
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.tokenize(text))  # type: ignore[attr-defined]

    def decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.detokenize(list(tokens))  # type: ignore[attr-defined]


class UnsupportedRequest(ValueError):
    """A request asks for something the engine does not do (yet)."""


def _key(request: Request) -> tuple:
    return (
        request.prompt,
        request.echo_prompt,
        request.max_tokens,
        tuple(request.stop_sequences),
        request.num_completions,
        request.temperature,
    )


class InProcessModel:
    """An `Engine` and its tokenizer, answering HELM requests."""

    def __init__(self, engine: Engine, tokenizer: TextTokenizer):
        self.engine = engine
        self.tokenizer = tokenizer
        self._answers: dict[tuple, RequestResult] = {}

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def prefetch(self, requests: Sequence[Request]) -> None:
        """Answer `requests` in batches (identical requests once) and keep the answers for HELM."""
        unique = {_key(r): r for r in requests if _key(r) not in self._answers}
        scoring = [r for r in unique.values() if r.echo_prompt]
        generation = [r for r in unique.values() if not r.echo_prompt]
        for batch, answer in ((scoring, self._score), (generation, self._generate)):
            if not batch:
                continue
            started = time.time()
            try:
                results = answer(batch)
            except (RequestTooLong, UnsupportedRequest) as error:
                results = [_failure(error) for _ in batch]
            elapsed = (time.time() - started) / len(batch)
            for request, result in zip(batch, results):
                result.request_time = elapsed
                result.request_datetime = int(started)
                self._answers[_key(request)] = result

    def answer(self, request: Request) -> RequestResult:
        """The answer to one request: prefetched, else computed now."""
        key = _key(request)
        if key not in self._answers:
            self.prefetch([request])
        return self._answers[key]

    def forget(self) -> None:
        """Drop kept answers (between HELM runs and between checkpoints)."""
        self._answers.clear()

    def _score(self, requests: Sequence[Request]) -> list[RequestResult]:
        for request in requests:
            if request.max_tokens != 0:
                raise UnsupportedRequest("echo_prompt with max_tokens > 0 is not supported")
        prompts = [self.tokenizer.encode(r.prompt) for r in requests]
        scores = self.engine.score(prompts)
        results = []
        for request, tokens, logprobs in zip(requests, prompts, scores):
            output = GeneratedOutput(
                text=request.prompt,
                logprob=sum(logprobs),
                tokens=[Token(self.piece(t), lp) for t, lp in zip(tokens, logprobs)],
                finish_reason={"reason": "length"},
            )
            results.append(_success([output] * request.num_completions))
        return results

    def _generate(self, requests: Sequence[Request]) -> list[RequestResult]:
        for request in requests:
            if request.temperature > 0 and request.num_completions > 1:
                raise UnsupportedRequest("sampling several completions (temperature > 0) is not supported")
        generations = self.engine.generate(
            [
                GenerationRequest(self.tokenizer.encode(r.prompt), r.max_tokens, self._stop_check(r.stop_sequences))
                for r in requests
            ]
        )
        results = []
        for request, generation in zip(requests, generations):
            output = GeneratedOutput(
                text=self.tokenizer.decode(generation.tokens),
                logprob=sum(generation.logprobs),
                tokens=[Token(self.piece(t), lp) for t, lp in zip(generation.tokens, generation.logprobs)],
                finish_reason={"reason": generation.finish_reason},
            )
            # The same post-processing as HELM's own clients: cut at the first stop sequence.
            output = truncate_sequence(output, request, print_warning=False)
            results.append(_success([output] * request.num_completions))
        return results

    def _stop_check(self, stop_sequences: list[str]):
        if not stop_sequences:
            return None

        def is_done(tokens: list[int]) -> bool:
            text = self.tokenizer.decode(tokens)
            return any(stop in text for stop in stop_sequences)

        return is_done


def _success(completions: list[GeneratedOutput]) -> RequestResult:
    return RequestResult(success=True, cached=False, completions=completions, embedding=[])


def _failure(error: Exception) -> RequestResult:
    # Never retriable: HELM would otherwise retry five times with back-off of up to 80 s.
    return RequestResult(
        success=False,
        cached=False,
        error=str(error),
        completions=[],
        embedding=[],
        error_flags=ErrorFlags(is_retriable=False, is_fatal=True),
    )


_MODELS: dict[str, InProcessModel] = {}


def register_model(key: str, model: InProcessModel) -> None:
    """Make `model` reachable by HELM clients and tokenizers created with `backend=key`."""
    _MODELS[key] = model


def registered_model(key: str) -> InProcessModel:
    if key not in _MODELS:
        raise LookupError(f"no in-process model registered under {key!r}; the hook registers it before HELM runs")
    return _MODELS[key]


class InProcessClient(Client):
    """HELM client for the model registered under `backend` (a plain `Client`: never cached)."""

    def __init__(self, backend: str, **_: object):
        self.backend = backend

    def make_request(self, request: Request) -> RequestResult:
        try:
            return registered_model(self.backend).answer(request)
        except Exception as error:  # HELM retries exceptions with minutes of back-off; fail at once
            return _failure(error)


class InProcessTokenizer(Tokenizer):
    """HELM tokenizer for the run's own tokenizer, registered under `backend` (never cached)."""

    def __init__(self, backend: str, **_: object):
        self.backend = backend

    def tokenize(self, request: TokenizationRequest) -> TokenizationRequestResult:
        model = registered_model(self.backend)
        tokens = model.tokenizer.encode(request.text)
        if request.truncation:
            tokens = tokens[: request.max_length]
        values = tokens if request.encode else [model.piece(t) for t in tokens]
        return TokenizationRequestResult(
            success=True, cached=False, text=request.text, tokens=[TokenizationToken(v) for v in values]
        )

    def decode(self, request: DecodeRequest) -> DecodeRequestResult:
        text = registered_model(self.backend).tokenizer.decode(list(request.tokens))
        return DecodeRequestResult(success=True, cached=False, text=text)
