"""`megatron-eval results --summary`: per benchmark, its noise, its trend over the run, and a verdict."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megatron_eval_hook.cli import main
from megatron_eval_hook.ledger import Ledger, MetricValue
from megatron_eval_hook.trend import DETECTABLE, trends


def evaluation(ledger: Ledger, iteration: int, benchmark: str, values, tokens: int | None = None) -> None:
    attempt = ledger.begin("run", iteration, benchmark, placement="sync", tokens=tokens, main_metric="em",
                           main_split="test")  # fmt: skip
    mean = float(np.mean(values))
    ledger.finish_ok(attempt, [MetricValue("em", "test", mean, len(values))], 1.0,
                     [[(f"id{i}", float(v)) for i, v in enumerate(values)]])  # fmt: skip


def test_a_rising_curve_a_flat_one_and_too_few_checkpoints_get_their_verdicts(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    rng = np.random.default_rng(0)
    for step, accuracy in enumerate((0.3, 0.4, 0.5, 0.6, 0.7), start=1):
        tokens = step * 10**9
        evaluation(ledger, step * 100, "rising", rng.random(200) < accuracy, tokens)
        evaluation(ledger, step * 100, "flat", rng.random(200) < 0.5, tokens)
        if step <= 2:
            evaluation(ledger, step * 100, "young", rng.random(200) < 0.5, tokens)
    found = {t.benchmark: t for t in trends(ledger)}
    assert found["rising"].verdict == "rising beyond noise" and found["rising"].kendall_tau == pytest.approx(1.0)
    assert found["rising"].slope == pytest.approx(0.1, abs=0.03) and found["rising"].slope_per == "1B tokens"
    assert found["flat"].verdict == "flat within noise" and found["flat"].slope_low < 0 < found["flat"].slope_high
    assert found["young"].verdict == "not enough checkpoints" and found["young"].slope is None


def test_the_detectable_change_comes_from_the_two_latest_evaluations_paired(tmp_path, capsys):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    before = [1, 0, 1, 1, 0, 0, 1, 0] * 25
    after = [1, 1, 1, 1, 0, 0, 0, 0] * 25  # two changes in each 8: one each way
    evaluation(ledger, 100, "boolq", before)
    evaluation(ledger, 200, "boolq", after)
    (trend,) = trends(ledger)
    differences = np.array(after, dtype=float) - np.array(before, dtype=float)
    assert trend.detectable_change == pytest.approx(DETECTABLE * differences.std(ddof=1) / math.sqrt(200))
    assert trend.instances == 200
    assert trend.instances_for_target == math.ceil(200 * (trend.detectable_change / 0.02) ** 2)
    assert main(["results", "--ledger", str(ledger.path), "--summary", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["verdict"] == "not enough checkpoints" and row["stderr"] == pytest.approx(trend.stderr)
