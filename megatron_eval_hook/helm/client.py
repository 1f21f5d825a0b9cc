"""HELM `Client` and `Tokenizer` that answer in-process with the live training model.

HELM creates clients and tokenizers from import paths with plain-data arguments, so the live
model is handed over through a registry keyed by a string (`register_model`). Neither class
caches: a request cache keyed by the prompt would return an older checkpoint's answers.

`InProcessModel.prefetch` answers all requests of a HELM run in batched forward passes before
HELM asks for them one by one; `make_request` then only looks the answer up.

Multiple-choice "separate" runs ask for the log-probability of every token of "question answer"
(echo), but HELM's metrics read only the answer's own tokens (`compute_logprob_and_length` in
helm/benchmark/metrics/basic_metrics.py takes the last len(tokenize(" " + answer)) tokens).
For those runs the engine computes only these; the question's tokens report log-probability 0.0.
"""

from __future__ import annotations

import math
import time
import weakref
from array import array
from collections.abc import Sequence
from typing import Protocol

from helm.benchmark.adaptation.adapter_spec import (
    ADAPT_MULTIPLE_CHOICE_SEPARATE_CALIBRATED,
    ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL,
)
from helm.benchmark.adaptation.request_state import RequestState
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


# The token ids of the texts each Megatron tokenizer encoded: HELM asks for the same prompts at
# every evaluation. Keyed by the tokenizer object itself, weakly: another tokenizer starts afresh.
_ENCODED: weakref.WeakKeyDictionary[object, dict[str, array]] = weakref.WeakKeyDictionary()
_MAX_ENCODED_TEXTS = 50_000


class MegatronTokenizer:
    """A Megatron tokenizer (`megatron.training.get_tokenizer()`) as a `TextTokenizer`."""

    def __init__(self, tokenizer: object):
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        encoded = _ENCODED.setdefault(self._tokenizer, {})
        ids = encoded.get(text)
        if ids is None:
            if len(encoded) >= _MAX_ENCODED_TEXTS:
                encoded.clear()
            ids = encoded[text] = array("i", self._tokenizer.tokenize(text))  # type: ignore[attr-defined]
        return list(ids)

    def decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.detokenize(list(tokens))  # type: ignore[attr-defined]


# adapter methods whose metrics read only the answer's tokens of an echoed "question answer"
_ANSWER_ONLY_METHODS = (ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL, ADAPT_MULTIPLE_CHOICE_SEPARATE_CALIBRATED)


class UnsupportedRequest(ValueError):
    """A request asks for something the engine does not do (yet)."""


class NonFiniteOutput(ArithmeticError):
    """The model produced NaN or infinite log-probabilities: its benchmark fails instead of being scored."""


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
        self._pieces: dict[int, str] = {}  # token -> its text: every answer token of every request is named

    def piece(self, token: int) -> str:
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.tokenizer.decode([token])
        return text

    def prefetch(self, states: Sequence[RequestState], adapter_method: str | None = None) -> None:
        """Answer the requests of a HELM run in batches (identical requests once); keep the answers for HELM.

        `adapter_method`: the run's `AdapterSpec.method`, which tells what of an answer HELM reads.
        """
        reads: dict[tuple, int | None] = {}  # request -> how many final tokens HELM reads; None: all
        requests: dict[tuple, Request] = {}
        for state in states:
            key = _key(state.request)
            tokens = None
            if adapter_method in _ANSWER_ONLY_METHODS and state.reference_index is not None:
                answer = state.instance.references[state.reference_index].output.text
                tokens = len(self.tokenizer.encode(f" {answer}"))
            requests[key] = state.request
            reads[key] = tokens if reads.get(key, tokens) == tokens else None
        self._answer_all(list(requests.values()), reads)

    def answer(self, request: Request) -> RequestResult:
        """The answer to one request: prefetched, else computed now (every token's log-prob)."""
        key = _key(request)
        if key not in self._answers:
            self._answer_all([request], {key: None})
        return self._answers[key]

    def _answer_all(self, requests: list[Request], reads: dict[tuple, int | None]) -> None:
        requests = [r for r in requests if _key(r) not in self._answers]
        scoring = [r for r in requests if r.echo_prompt]
        generation = [r for r in requests if not r.echo_prompt]
        for batch, answer in (
            (scoring, lambda batch: self._score(batch, [reads[_key(r)] for r in batch])),
            (generation, self._generate),
        ):
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

    def forget(self) -> None:
        """Drop kept answers (between HELM runs and between checkpoints)."""
        self._answers.clear()

    def _score(self, requests: Sequence[Request], reads: Sequence[int | None]) -> list[RequestResult]:
        for request in requests:
            if request.max_tokens != 0:
                raise UnsupportedRequest("echo_prompt with max_tokens > 0 is not supported")
        prompts = [self.tokenizer.encode(r.prompt) for r in requests]
        needed_from = [0 if n is None else len(p) - n for p, n in zip(prompts, reads)]
        scores = self.engine.score(prompts, needed_from)
        _refuse_non_finite("scoring", scores)
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
                GenerationRequest(self.tokenizer.encode(r.prompt), r.max_tokens, tuple(r.stop_sequences))
                for r in requests
            ]
        )
        _refuse_non_finite("generation", [g.logprobs for g in generations])
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


def _refuse_non_finite(kind: str, logprobs: Sequence[Sequence[float]]) -> None:
    """Raise `NonFiniteOutput` when the engine's log-probabilities for any request (before HELM cuts a
    completion at its stop sequence) hold a NaN or infinity: a greedy token chosen from NaN logits, or a
    log-probability summed into a score, would otherwise make a number that looks real."""
    bad = sum(1 for values in logprobs if not all(math.isfinite(v) for v in values))
    if bad:
        raise NonFiniteOutput(
            f"the model produced NaN/Inf log-probabilities on {bad} of {len(logprobs)} {kind} requests: its "
            "weights or activations are not finite at this checkpoint, so no score is recorded"
        )


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
