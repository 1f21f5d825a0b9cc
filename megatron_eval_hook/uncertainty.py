"""How much to believe a score: its standard error and 95% interval, from the per-instance values.

- An accuracy (every instance scores 0 or 1): the standard error as lm-evaluation-harness reports it
  (the sample standard deviation over the square root of n) and Wilson's score interval, which stays inside
  [0, 1] and keeps its coverage near 0 and 1 where the normal interval does not.
- Any other metric (F1, ROUGE, a log-probability): the same standard error and a percentile bootstrap interval
  over instances, seeded, so the same values always give the same interval.
- A benchmark averaging several HELM runs (e.g. MMLU subjects): the mean of the runs' means, its standard error
  from theirs (independent samples), and the normal interval around it, clipped to the runs' range of values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
RESAMPLES = 2000
SEED = 20260807


@dataclass(frozen=True)
class Interval:
    """A score's standard error and 95% interval."""

    stderr: float
    low: float
    high: float


def standard_error(values: Sequence[float]) -> float:
    """The sample standard deviation of `values` over the square root of their number (0 for one value)."""
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def wilson(successes: float, n: int) -> tuple[float, float]:
    """Wilson's 95% score interval of a proportion `successes / n`."""
    p = successes / n
    center = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap(values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of the mean of `values` (resampled instances, seeded)."""
    data = np.asarray(values, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    low, high = np.percentile(data[picks].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def of_values(values: Sequence[float]) -> Interval:
    """The interval of the mean of one run's per-instance `values`."""
    if is_binary(values):
        low, high = wilson(sum(values), len(values))
    else:
        low, high = bootstrap(values)
    return Interval(standard_error(values), low, high)


def combined_error(runs: Sequence[Sequence[float]]) -> float:
    """The standard error of the mean of the runs' means (independent runs)."""
    return math.sqrt(sum(standard_error(run) ** 2 for run in runs)) / len(runs)


def by_run(values: Mapping[tuple[int, str], float]) -> list[list[float]]:
    """Values keyed by (HELM run index, instance id) as one list per run, each in instance-id order: two sides
    with the same keys line up instance by instance."""
    runs: dict[int, list[float]] = {}
    for (index, _), value in sorted(values.items()):
        runs.setdefault(index, []).append(value)
    return [runs[index] for index in sorted(runs)]


def of_runs(runs: Sequence[Sequence[float]]) -> Interval | None:
    """The interval of a benchmark's score, the mean of its runs' means; None when a run has no values."""
    if not runs or any(len(run) == 0 for run in runs):
        return None
    if len(runs) == 1:
        return of_values(runs[0])
    mean = sum(float(np.mean(run)) for run in runs) / len(runs)
    stderr = combined_error(runs)
    floor = min(min(run) for run in runs)
    ceiling = max(max(run) for run in runs)
    return Interval(stderr, max(floor, mean - Z95 * stderr), min(ceiling, mean + Z95 * stderr))
