"""Signal against noise, per benchmark over a run: is the curve going anywhere the noise cannot explain?

For each (run, benchmark), from the ledger's main scores and per-instance values:
- noise: the latest score's standard error, and the smallest change a paired test of two checkpoints could
  detect at the current instance count (80% power at a two-sided 5% level: 2.8 standard errors of the paired
  difference, from the per-instance differences of the two latest evaluations);
- signal: Kendall's tau of the score against training tokens (iterations where tokens are unknown), and the
  least-squares slope per billion (or million) tokens, or per 1,000 iterations, with its 95% interval;
- a verdict: "rising beyond noise" / "falling beyond noise" when the slope's interval excludes zero,
  "flat within noise" otherwise, "not enough checkpoints" under `MIN_CHECKPOINTS`;
- how many instances a paired test would need to detect a change of `TARGET_CHANGE` (it scales as 1/√n).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from megatron_eval_hook.ledger import Ledger
from megatron_eval_hook.uncertainty import Z95, by_run, combined_error

MIN_CHECKPOINTS = 3
TARGET_CHANGE = 0.02
DETECTABLE = Z95 + 0.8416212335729143  # z(0.975) + z(0.80)


@dataclass(frozen=True)
class Trend:
    run: str
    benchmark: str
    metric: str
    checkpoints: int
    latest: float
    stderr: float | None
    detectable_change: float | None  # the smallest change a paired test detects at this instance count
    kendall_tau: float | None
    slope: float | None  # per billion tokens, or per 1,000 iterations
    slope_low: float | None
    slope_high: float | None
    slope_per: str  # the unit of x: "1B tokens", "1M tokens", "1k iterations" or "iteration"
    verdict: str
    instances: int | None
    instances_for_target: int | None  # instances needed to detect TARGET_CHANGE

    def to_json(self) -> dict:
        return asdict(self)


def trends(ledger: Ledger, run: str | None = None, rows: list[dict] | None = None) -> list[Trend]:
    """One `Trend` per (run, benchmark) with an `ok` evaluation; `rows`: `ledger.results(run=run)`, when the
    caller has them already (each score's interval is computed there)."""
    rows = [r for r in (ledger.results(run=run) if rows is None else rows) if r["status"] == "ok" and r["main"]]
    found = []
    for key in dict.fromkeys((r["run"], r["benchmark"]) for r in rows):
        series: dict[int, dict] = {}
        for row in rows:
            if (row["run"], row["benchmark"]) == key:
                series[row["iteration"]] = row  # the latest evaluation of each iteration
        found.append(_trend(ledger, *key, [series[i] for i in sorted(series)]))
    return found


def _trend(ledger: Ledger, run: str, benchmark: str, points: list[dict]) -> Trend:
    latest = points[-1]
    use_tokens = all(p["tokens"] for p in points)
    if use_tokens:
        scale, per = (1e9, "1B tokens") if points[-1]["tokens"] >= 1e9 else (1e6, "1M tokens")
    else:
        scale, per = (1e3, "1k iterations") if points[-1]["iteration"] >= 1e3 else (1.0, "iteration")
    x = np.array([(p["tokens"] if use_tokens else p["iteration"]) / scale for p in points], dtype=float)
    y = np.array([p["value"] for p in points], dtype=float)
    tau = slope = low = high = None
    verdict = "not enough checkpoints"
    if len(points) >= MIN_CHECKPOINTS and np.ptp(x) > 0:
        from scipy import stats

        tau = float(stats.kendalltau(x, y).statistic)
        fit = stats.linregress(x, y)
        half = stats.t.ppf(0.975, len(points) - 2) * fit.stderr
        slope, low, high = float(fit.slope), float(fit.slope - half), float(fit.slope + half)
        if math.isnan(tau):
            tau = 0.0  # a constant score
        verdict = "rising beyond noise" if low > 0 else "falling beyond noise" if high < 0 else "flat within noise"
    detectable, n = _detectable_change(ledger, run, benchmark, points)
    needed = None if detectable is None else math.ceil(n * (detectable / TARGET_CHANGE) ** 2)
    return Trend(
        run=run,
        benchmark=benchmark,
        metric=latest["metric"],
        checkpoints=len(points),
        latest=float(latest["value"]),
        stderr=latest.get("stderr"),
        detectable_change=detectable,
        kendall_tau=tau,
        slope=slope,
        slope_low=low,
        slope_high=high,
        slope_per=per,
        verdict=verdict,
        instances=n,
        instances_for_target=needed,
    )


def _detectable_change(ledger: Ledger, run: str, benchmark: str, points: list[dict]) -> tuple[float | None, int | None]:
    """2.8 standard errors of the paired difference of the two latest evaluations' per-instance values (of the
    latest one alone, unpaired, when there is one), and the instance count."""
    ids = [ledger.ok_evaluations(run, p["iteration"]).get(benchmark, (None,))[0] for p in points[-2:]]
    values = [ledger.instances_by_key(i) for i in ids if i is not None]
    if not values or not values[-1]:
        return None, None
    latest = values[-1]
    stderr = 0.0
    if len(values) == 2 and set(values[0]) == set(latest) and len(latest) > 1:
        stderr = combined_error(by_run({key: value - values[0][key] for key, value in latest.items()}))
    if stderr == 0.0:  # unpaired, or the two answered every instance alike: from the latest score's own error
        stderr = math.sqrt(2) * combined_error(by_run(latest))
    if stderr == 0.0:  # every instance scored alike (e.g. all right): no spread to tell a change from
        return None, len(latest)
    return DETECTABLE * stderr, len(latest)


def format_trends(found: list[Trend]) -> str:
    header = (
        f"{'run':<12} {'benchmark':<14} {'n':>4} {'ckpts':>5} {'latest':>7} {'±se':>6} {'detects':>8} "
        f"{'tau':>6} {'slope [95%]':>26}  {'verdict':<22} {'n for ±0.02':>11}"
    )
    lines = [header]
    for t in found:
        slope = "" if t.slope is None else f"{t.slope:+.3f} [{t.slope_low:+.3f}, {t.slope_high:+.3f}]"
        lines.append(
            f"{t.run:<12} {t.benchmark:<14} {t.instances or '':>4} {t.checkpoints:>5} {t.latest:>7.3f} "
            f"{_number(t.stderr):>6} {_number(t.detectable_change):>8} {_number(t.kendall_tau, '+.2f'):>6} "
            f"{slope:>26}  {t.verdict:<22} {t.instances_for_target or '':>11}"
        )
    per = {t.slope_per for t in found}
    lines += [
        "",
        f"slope per {' / '.join(sorted(per))}; 'detects': the smallest change a paired test of two checkpoints "
        "detects (80% power, 5% level); 'n for ±0.02': instances it would take to detect a 0.02 change",
    ]
    return "\n".join(lines)


def _number(value: float | None, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)
