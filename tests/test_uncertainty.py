"""A score's standard error and 95% interval: calibrated on simulated per-instance data whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_eval_hook.uncertainty import Z95, bootstrap, of_runs, of_values, standard_error, wilson

DRAWS = 2000  # seeded simulations of an evaluation whose true score is known


@pytest.mark.parametrize("truth, n", [(0.5, 100), (0.25, 100), (0.9, 200)])
def test_wilson_intervals_cover_a_true_accuracy_95_percent_of_the_time(truth, n):
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(DRAWS):
        low, high = wilson(float(rng.binomial(n, truth)), n)
        covered += low <= truth <= high
    assert 0.93 <= covered / DRAWS <= 0.97


def test_bootstrap_intervals_cover_a_true_mean_f1_95_percent_of_the_time():
    """Per-instance F1-like scores: a third are 0, the rest spread over (0, 1]; the true mean is known exactly."""
    rng = np.random.default_rng(2)
    truth = (2 / 3) * (2 / (2 + 3))  # P(nonzero) times the mean of Beta(2, 3)
    covered = 0
    for draw in range(DRAWS):
        values = np.where(rng.random(100) < 1 / 3, 0.0, rng.beta(2, 3, 100))
        low, high = bootstrap(values, resamples=1000, seed=draw)
        covered += low <= truth <= high
    assert 0.93 <= covered / DRAWS <= 0.97


def test_an_accuracy_gets_wilsons_interval_and_a_continuous_score_a_seeded_bootstrap():
    accuracy = of_values([1.0] * 30 + [0.0] * 70)
    assert (accuracy.low, accuracy.high) == wilson(30, 100)
    assert accuracy.stderr == pytest.approx(np.std([1.0] * 30 + [0.0] * 70, ddof=1) / 10)  # lm-eval's stderr
    f1 = [0.0, 0.5, 0.25, 1.0, 0.75] * 4
    assert of_values(f1) == of_values(list(f1))  # the same values, the same interval
    assert of_values(f1).low < np.mean(f1) < of_values(f1).high
    assert of_values([1.0] * 14).high == 1.0 and of_values([1.0] * 14).low < 1.0  # never a zero-width certainty


def test_a_benchmark_averaging_runs_combines_their_errors():
    runs = [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0, 1.0, 0.0]]
    combined = of_runs(runs)
    expected = np.sqrt(standard_error(runs[0]) ** 2 + standard_error(runs[1]) ** 2) / 2
    assert combined.stderr == pytest.approx(expected)
    mean = (0.75 + 2 / 6) / 2
    assert combined.low == pytest.approx(max(0.0, mean - Z95 * expected))
    assert of_runs([]) is None and of_runs([[1.0], []]) is None
