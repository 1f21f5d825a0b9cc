"""The ledger: every attempt recorded, nothing lost, readable by the CLI."""

from __future__ import annotations

import json

from megatron_eval_hook.cli import main
from megatron_eval_hook.ledger import Ledger, MetricValue


def fill(ledger: Ledger) -> None:
    ok = ledger.begin("run-a", 100, "boolq", placement="sync", tokens=4096, main_metric="qem", main_split="valid")
    ledger.finish_ok(ok, [MetricValue("qem", "valid", 0.5, 20), MetricValue("em", "valid", 0.25, 20)], 1.5)
    failed = ledger.begin("run-a", 100, "mmlu", placement="sync", main_metric="exact_match", main_split="test")
    ledger.finish_failed(failed, "BenchmarkError: no instances", 0.2)
    ledger.record_skipped("run-a", 200, "boolq", "already evaluated", placement="sync")
    ledger.set_blocked([ok, failed], 2.0)


def test_results_hold_ok_failed_and_skipped_attempts_with_main_metrics(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    fill(ledger)
    rows = ledger.results()
    assert [(r["iteration"], r["benchmark"], r["status"], r["metric"], r["value"]) for r in rows] == [
        (100, "boolq", "ok", "qem", 0.5),
        (100, "mmlu", "failed", None, None),
        (200, "boolq", "skipped", None, None),
    ]
    assert rows[1]["error"] == "BenchmarkError: no instances"
    assert rows[0]["blocked_s"] == 2.0 and rows[0]["tokens"] == 4096 and rows[0]["error"] is None


def test_all_metrics_lists_every_metric_of_an_ok_attempt(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    fill(ledger)
    metrics = [(r["metric"], r["main"]) for r in ledger.results(all_metrics=True) if r["status"] == "ok"]
    assert sorted(metrics) == [("em", False), ("qem", True)]


def test_an_attempt_left_running_by_a_dead_process_becomes_failed(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path).begin("run-a", 300, "boolq", placement="sync")
    assert Ledger(path).results() == []  # still running: not a result yet
    assert Ledger(path).close_interrupted("run-a") == 1
    (row,) = Ledger(path).results()
    assert row["status"] == "failed" and "interrupted" in row["error"]


def test_cli_results_json_prints_the_documented_fields(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite"
    fill(Ledger(path))
    assert main(["results", "--ledger", str(path), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    for key in ("run", "iteration", "benchmark", "metric", "value", "status", "error", "started_at", "duration_s"):
        assert key in rows[0]


def test_cli_results_table_and_a_missing_ledger(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite"
    fill(Ledger(path))
    assert main(["results", "--ledger", str(path)]) == 0
    table = capsys.readouterr().out
    assert "boolq" in table and "skipped" in table and "0.5000" in table
    assert main(["results", "--ledger", str(tmp_path / "none.sqlite")]) == 2
    assert "no ledger" in capsys.readouterr().err
