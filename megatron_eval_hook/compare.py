"""Is this change real? Two evaluations compared on the same instances, per benchmark.

`megatron-eval compare --ledger L --run A [--iteration I] --vs-run B [--vs-iteration J]` pairs the per-instance
values the ledger holds for each benchmark both evaluations scored (`instances` table) and reports, per
benchmark, the difference A − B of the main score, its 95% interval, and a p-value from a paired test:

- accuracies (every value 0 or 1): the exact McNemar test on the instances the two got differently (a
  two-sided binomial test of the discordant pairs, as NeMo-Evaluator's compare does);
- other metrics (F1, ROUGE): a paired sign-flip permutation test of the per-instance differences (seeded).

The interval is a paired bootstrap over instances (seeded). A benchmark averaging several HELM runs (MMLU
subjects) is compared run by run, resampled within each run, its difference the mean of the runs'. The
p-values are adjusted for testing several benchmarks at once with Holm's step-down correction. Two
evaluations of different instance sets (e.g. a changed `max_eval_instances`) are refused with the reason,
never compared unpaired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from megatron_eval_hook.ledger import Ledger
from megatron_eval_hook.uncertainty import SEED, by_run, is_binary

RESAMPLES = 4000


class CompareError(ValueError):
    """The two evaluations cannot be compared; the message says why and what to do."""


@dataclass(frozen=True)
class Comparison:
    """Evaluation A against evaluation B on one benchmark."""

    benchmark: str
    metric: str
    instances: int
    value: float  # A's score
    vs_value: float  # B's score
    difference: float  # A - B
    ci_low: float
    ci_high: float
    test: str  # mcnemar | sign-flip permutation
    p_value: float
    p_holm: float  # adjusted for the number of benchmarks compared

    def to_json(self) -> dict:
        return asdict(self)


def mcnemar(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value of paired 0/1 outcomes: the discordant pairs against a fair coin."""
    only_a = sum(1 for x, y in zip(a, b) if x > y)
    only_b = sum(1 for x, y in zip(a, b) if y > x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _stratified_mean(runs: Sequence[np.ndarray]) -> float:
    return float(np.mean([run.mean() for run in runs]))


def sign_flip(differences: Sequence[np.ndarray], resamples: int = RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of a paired sign-flip permutation test of the mean difference (mean over runs)."""
    rng = np.random.default_rng(seed)
    observed = abs(_stratified_mean(differences))
    flipped = np.zeros(resamples)
    for run in differences:
        signs = rng.choice((-1.0, 1.0), size=(resamples, len(run)))
        flipped += (signs * run).mean(axis=1)
    flipped /= len(differences)
    return float((1 + np.sum(np.abs(flipped) >= observed - 1e-12)) / (resamples + 1))


def paired_bootstrap(
    differences: Sequence[np.ndarray], resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """The 95% percentile interval of the mean difference, instances resampled in pairs within each run."""
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for run in differences:
        picks = rng.integers(0, len(run), size=(resamples, len(run)))
        means += run[picks].mean(axis=1)
    means /= len(differences)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def adjusted(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """`comparisons` of several benchmarks with their p-values Holm-adjusted over them (`p_holm`)."""
    return [replace(c, p_holm=p) for c, p in zip(comparisons, holm([c.p_value for c in comparisons]))]


def compare_values(
    benchmark: str, metric: str, a: dict[tuple[int, str], float], b: dict[tuple[int, str], float], where: str
) -> Comparison:
    """One benchmark's comparison (its p-value not yet adjusted) from the two sides' values by (run, instance)."""
    if set(a) != set(b):
        common = len(set(a) & set(b))
        raise CompareError(
            f"{benchmark}: the two evaluations scored different instances ({where}: {len(a)} and {len(b)}, "
            f"{common} in common), so they cannot be paired: e.g. max_eval_instances or the benchmark's data "
            "changed between them. Fix: compare evaluations made with the same benchmark settings."
        )
    sides = [[np.array(run) for run in by_run(side)] for side in (a, b)]
    differences = [x - y for x, y in zip(*sides)]
    binary = is_binary(list(a.values()) + list(b.values()))
    if binary:
        p_value = mcnemar(np.concatenate(sides[0]), np.concatenate(sides[1]))
    else:
        p_value = sign_flip(differences)
    low, high = paired_bootstrap(differences)
    value, vs_value = _stratified_mean(sides[0]), _stratified_mean(sides[1])
    return Comparison(
        benchmark=benchmark,
        metric=metric,
        instances=len(a),
        value=value,
        vs_value=vs_value,
        difference=value - vs_value,
        ci_low=low,
        ci_high=high,
        test="mcnemar" if binary else "sign-flip permutation",
        p_value=p_value,
        p_holm=p_value,
    )


def compare(ledger: Ledger, run: str, iteration: int | None, vs_run: str, vs_iteration: int | None) -> list[Comparison]:
    """Per benchmark both evaluations scored, A (`run` at `iteration`) against B (`vs_run` at `vs_iteration`);
    an iteration left out is the run's latest with an `ok` evaluation."""
    a_side = ledger.ok_evaluations(run, iteration)
    b_side = ledger.ok_evaluations(vs_run, vs_iteration)
    for name, side, at in (("--run", a_side, iteration), ("--vs-run", b_side, vs_iteration)):
        if not side:
            what = f"run {run if name == '--run' else vs_run!r}" + (f" at iteration {at}" if at is not None else "")
            raise CompareError(
                f"{name}: the ledger {ledger.path} holds no ok evaluation of {what}. Fix: name a run and iteration "
                "that `megatron-eval results` lists as ok."
            )
    common = [name for name in a_side if name in b_side]
    if not common:
        raise CompareError(
            f"the two evaluations share no benchmark ({sorted(a_side)} against {sorted(b_side)}). Fix: compare "
            "evaluations of the same benchmarks."
        )
    comparisons = []
    for name in common:
        (a_id, a_metric), (b_id, b_metric) = a_side[name], b_side[name]
        if a_metric != b_metric:
            raise CompareError(f"{name}: its main metric differs ({a_metric} against {b_metric}).")
        a_values, b_values = ledger.instances_by_key(a_id), ledger.instances_by_key(b_id)
        if not a_values or not b_values:
            raise CompareError(
                f"{name}: the ledger holds no per-instance values for evaluation {a_id if not a_values else b_id} "
                "(recorded before they were kept). Fix: compare evaluations made since, or evaluate that "
                "checkpoint again with `megatron-eval backfill`."
            )
        comparisons.append(compare_values(name, a_metric, a_values, b_values, "A and B"))
    return adjusted(comparisons)


def format_comparisons(comparisons: list[Comparison], a: str, b: str, alpha: float = 0.05) -> str:
    lines = [
        f"A = {a}, B = {b}; difference A - B, 95% paired interval, p-value (Holm-adjusted over "
        f"{len(comparisons)} benchmark(s))",
        "",
        f"{'benchmark':<16} {'metric':<20} {'n':>5} {'A':>7} {'B':>7} {'A-B':>7} {'95% interval':>18} "
        f"{'p':>7} {'p_holm':>7}  verdict",
    ]
    for c in comparisons:
        verdict = "real" if c.p_holm < alpha else "within noise"
        lines.append(
            f"{c.benchmark:<16} {c.metric:<20} {c.instances:>5} {c.value:>7.3f} {c.vs_value:>7.3f} "
            f"{c.difference:>+7.3f} {f'[{c.ci_low:+.3f}, {c.ci_high:+.3f}]':>18} {c.p_value:>7.3f} "
            f"{c.p_holm:>7.3f}  {verdict}"
        )
    lines += ["", f"exact McNemar test for accuracies, paired sign-flip permutation otherwise; 'real' where "
              f"p_holm < {alpha}"]  # fmt: skip
    return "\n".join(lines)
