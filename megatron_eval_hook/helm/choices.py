"""Early-signal scores of a multiple-choice benchmark, from the forward passes its HELM run already made.

Accuracy moves in steps of 1/n and stays at chance until a model gets answers right; the gold answer's
log-probability moves as soon as the model learns anything about it. "Signal and Noise" (Heineman et al.,
2025, arXiv 2508.13144) finds such continuous scores rank small models far better than accuracy. HELM's
`multiple_choice_separate_*` methods score each answer as a continuation of the question, so its
`scenario_state.json` already holds every answer's log-probability; nothing is computed again:

- `gold_bits_per_byte`: the gold answer's negative log-probability in bits, per byte of the answer as the
  model read it (with its leading space); lower is better;
- `gold_margin`: the gold answer's log-probability minus the best wrong answer's (nats); above 0, the model
  ranks the gold answer first.

Methods that ask for one letter (`multiple_choice_joint`) read no answer's log-probability: they get neither.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

SEPARATE_METHODS = ("multiple_choice_separate_original", "multiple_choice_separate_calibrated")
EARLY_SIGNAL_METRICS = ("gold_bits_per_byte", "gold_margin")


@dataclass(frozen=True)
class Choice:
    """One instance's answers, as the model scored them."""

    gold_logprob: float
    best_wrong_logprob: float
    gold_bytes: int

    @property
    def bits_per_byte(self) -> float:
        return -self.gold_logprob / math.log(2) / self.gold_bytes

    @property
    def margin(self) -> float:
        return self.gold_logprob - self.best_wrong_logprob


def early_signal(choices: list[Choice]) -> dict[str, float]:
    """The early-signal scores (`EARLY_SIGNAL_METRICS`) of a run: their means over its instances' `choices`."""
    return {
        "gold_bits_per_byte": sum(c.bits_per_byte for c in choices) / len(choices),
        "gold_margin": sum(c.margin for c in choices) / len(choices),
    }


def read_choices(path: Path) -> dict[str, Choice]:
    """Per instance id, its gold and best wrong answers' log-probabilities, from the `scenario_state.json` of a
    separate-method run (its original requests, first train trial, no perturbation); {} for other methods."""
    state = json.loads(path.read_text())
    if state["adapter_spec"]["method"] not in SEPARATE_METHODS:
        return {}
    scored: dict[str, tuple[dict, dict[int, float]]] = {}
    for request_state in state["request_states"]:
        instance = request_state["instance"]
        if request_state.get("request_mode") not in (None, "original") or instance.get("perturbation"):
            continue
        if request_state.get("train_trial_index", 0) != 0:
            continue
        completions = (request_state.get("result") or {}).get("completions") or []
        if completions and request_state.get("reference_index") is not None:
            answers = scored.setdefault(instance["id"], (instance, {}))[1]
            answers[request_state["reference_index"]] = float(completions[0]["logprob"])
    choices = {}
    for instance_id, (instance, answers) in scored.items():
        references = instance["references"]
        gold = [i for i, reference in enumerate(references) if "correct" in reference.get("tags", [])]
        if len(gold) != 1 or gold[0] not in answers or len(answers) < 2:
            continue  # not a single-answer question, or an answer HELM did not score
        wrong = max(logprob for i, logprob in answers.items() if i != gold[0])
        text = references[gold[0]]["output"]["text"]
        choices[instance_id] = Choice(answers[gold[0]], wrong, len((" " + text).encode("utf-8")))
    return choices
