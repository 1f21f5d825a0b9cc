"""A ledger holding what the leaderboard and the report must show, written with the Ledger API.

Run `alpha` is evaluated on three benchmarks at three iterations with token counts; its last
NarrativeQA evaluation failed with a reason holding markup. Run `beta & <i>co</i>` (a name that
needs escaping) has no token counts, two benchmarks at its first save and one skipped save.
Two baselines: one on MMLU with its tokens, one on BoolQ and HellaSwag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wandb_offline import records

from megatron_eval_hook.ledger import BaselineScore, Ledger, MetricValue

BETA = "beta & <i>co</i>"
INJECTED = "<script>console.error('injected')</script>"
MAIN_METRICS = {"mmlu": "exact_match", "boolq": "quasi_exact_match", "narrative_qa": "f1_score"}
BASELINES = [
    BaselineScore("pythia-160m", "mmlu", "exact_match", 0.26, 299892736000, "https://example.org/pythia"),
    BaselineScore("bloom-560m", "boolq", "quasi_exact_match", 0.55, None, "https://example.org/bloom"),
    BaselineScore("bloom-560m", "hellaswag", "exact_match", 0.32, None, "https://example.org/bloom"),
]


def _ok(ledger: Ledger, run: str, iteration: int, benchmark: str, value: float, tokens: int | None) -> int:
    metric = MAIN_METRICS[benchmark]
    evaluation = ledger.begin(
        run, iteration, benchmark, placement="sync", tokens=tokens, main_metric=metric, main_split="test"
    )
    metrics = [MetricValue(metric, "test", value, 20), MetricValue("other", "test", 0.9, 20)]
    ledger.finish_ok(evaluation, metrics, 2.0, [per_instance(metric, value)])
    return evaluation


def per_instance(metric: str, value: float, n: int = 20) -> list[tuple[str, float]]:
    """`n` per-instance values whose mean is `value`: right or wrong for an accuracy, spread around it otherwise."""
    if metric == "f1_score":
        return [(f"id{i}", value + (0.05 if i % 2 else -0.05)) for i in range(n)]
    right = round(value * n)
    return [(f"id{i}", float(i < right)) for i in range(n)]


def fill(ledger: Ledger) -> None:
    scores = {
        100: {"mmlu": 0.25, "boolq": 0.5, "narrative_qa": 0.1},
        200: {"mmlu": 0.40, "boolq": 0.7, "narrative_qa": 0.3},
        300: {"mmlu": 0.35, "boolq": 0.8},
    }
    for iteration, values in scores.items():
        ids = [_ok(ledger, "alpha", iteration, b, v, iteration * 4096) for b, v in values.items()]
        if iteration == 300:
            failed = ledger.begin(
                "alpha", 300, "narrative_qa", placement="sync", tokens=300 * 4096, main_metric="f1_score"
            )
            ledger.finish_failed(failed, f"RuntimeError: {INJECTED}", 0.5)
            ids.append(failed)
        ledger.set_blocked(ids, 7.0)
    ledger.set_blocked([_ok(ledger, BETA, 100, "mmlu", 0.5, None), _ok(ledger, BETA, 100, "boolq", 0.5, None)], 5.0)
    ledger.record_skipped(BETA, 200, "mmlu", "exit signal: <b>SIGTERM</b>", placement="sync")
    ledger.record_baselines(BASELINES)


def filled_ledger(path: Path) -> Path:
    fill(Ledger(path))
    return path


def summary_table(run_folder: Path, key: str) -> dict[str, Any]:
    """The W&B Table logged as summary value `key` of the offline run in `run_folder`: {"columns", "data"}."""
    (run_file,) = run_folder.glob("run-*.wandb")
    reference = None
    for record in records(run_file):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                if ("/".join(item.nested_key) or item.key) == key:
                    reference = json.loads(item.value_json)
    assert reference is not None and reference["_type"] == "table-file", f"no table {key!r} in {run_file}"
    return json.loads((run_folder / "files" / reference["path"]).read_text())


def summary_values(run_folder: Path) -> dict[str, Any]:
    """Every plain summary value of the offline run in `run_folder`."""
    (run_file,) = run_folder.glob("run-*.wandb")
    values = {}
    for record in records(run_file):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                values["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return values
