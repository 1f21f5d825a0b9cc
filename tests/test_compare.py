"""`megatron-eval compare`: paired tests calibrated on simulated checkpoints whose truth is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_eval_hook.cli import main
from megatron_eval_hook.compare import CompareError, compare, holm, mcnemar, sign_flip
from megatron_eval_hook.ledger import Ledger, MetricValue

DRAWS = 2000
ALPHA = 0.05
SIMULATION_ERROR = 3 * (ALPHA * (1 - ALPHA) / DRAWS) ** 0.5  # three standard errors of a rate near alpha


def checkpoints(rng, n: int, drop: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-instance correctness of two consecutive checkpoints. Each instance has a probability p ~ Beta(0.2, 0.2)
    of being answered right, which both share: with a mean of 0.5 they agree on 86% of instances when nothing
    changed (1 - 2 E[p (1 - p)]). Consecutive checkpoints of a run answer mostly the same questions right and
    the same ones wrong; an independent model of each checkpoint (agreement 50%) would make every test look
    weaker than it is. The second is right with probability p (1 - 2 drop): a true drop of `drop`."""
    p = rng.beta(0.2, 0.2, n)
    return (rng.random(n) < p).astype(float), (rng.random(n) < p * (1 - 2 * drop)).astype(float)


def test_mcnemar_false_positives_under_no_change_are_near_alpha_not_above():
    rng = np.random.default_rng(3)
    rate = np.mean([mcnemar(*checkpoints(rng, 200, 0.0)) < ALPHA for _ in range(DRAWS)])
    assert 0.02 <= rate <= ALPHA + SIMULATION_ERROR


def test_mcnemar_detects_a_true_ten_point_drop_on_200_instances():
    rng = np.random.default_rng(4)
    power = np.mean([mcnemar(*checkpoints(rng, 200, 0.10)) < ALPHA for _ in range(DRAWS)])
    assert power >= 0.80


def test_the_sign_flip_test_of_a_continuous_score_is_calibrated():
    """F1-like scores of two checkpoints sharing each instance's difficulty, with no change between them."""
    rng = np.random.default_rng(5)
    false_positives = 0
    draws = 1000
    for draw in range(draws):
        difficulty = rng.beta(2, 2, 100)
        a, b = (np.clip(difficulty + rng.normal(0, 0.15, 100), 0, 1) for _ in range(2))
        false_positives += sign_flip([a - b], resamples=500, seed=draw) < ALPHA
    assert 0.02 <= false_positives / draws <= ALPHA + 3 * (ALPHA * (1 - ALPHA) / draws) ** 0.5


def test_holm_adjusts_step_down_and_keeps_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]


def evaluation(ledger: Ledger, iteration: int, benchmark: str, values: list[float], ids=None) -> None:
    attempt = ledger.begin("run", iteration, benchmark, placement="sync", main_metric="em", main_split="test")
    ids = ids or [f"id{i}" for i in range(len(values))]
    mean = sum(values) / len(values)
    ledger.finish_ok(attempt, [MetricValue("em", "test", mean, len(values))], 1.0, [list(zip(ids, values))])


def test_compare_pairs_instances_and_refuses_different_instance_sets(tmp_path, capsys):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    rng = np.random.default_rng(6)
    before, after = checkpoints(rng, 200, 0.0)
    evaluation(ledger, 100, "boolq", list(before))
    evaluation(ledger, 200, "boolq", list(np.maximum(after, before)))  # better on every instance it changed
    evaluation(ledger, 100, "facts", [1.0, 0.0] * 10)
    evaluation(ledger, 200, "facts", [1.0, 0.0] * 10)
    assert main(["compare", "--ledger", str(ledger.path), "--run", "run", "--iteration", "200",
                 "--vs-iteration", "100", "--format", "json"]) == 0  # fmt: skip
    found = {c["benchmark"]: c for c in json.loads(capsys.readouterr().out)}
    assert found["boolq"]["difference"] > 0 and found["boolq"]["p_holm"] < ALPHA and found["boolq"]["test"] == "mcnemar"
    assert found["facts"]["difference"] == 0 and found["facts"]["p_value"] == 1.0
    assert found["boolq"]["ci_low"] > 0 and found["boolq"]["instances"] == 200

    evaluation(ledger, 300, "boolq", list(before[:100]))  # max_eval_instances halved
    with pytest.raises(CompareError, match="different instances .*max_eval_instances"):
        compare(ledger, "run", 300, "run", 100)
    assert main(["compare", "--ledger", str(ledger.path), "--run", "run", "--iteration", "300",
                 "--vs-iteration", "100"]) == 2  # fmt: skip
    assert "different instances" in capsys.readouterr().err
