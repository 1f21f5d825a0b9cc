"""The ledger: every attempt recorded, nothing lost, readable by the CLI."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_eval_hook.cli import main
from megatron_eval_hook.ledger import Ledger, LedgerUnusable, MetricValue


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


def test_an_attempt_left_running_by_a_dead_process_becomes_failed(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite"
    Ledger(path).begin("run-a", 300, "boolq", placement="sync")
    assert Ledger(path).results() == []  # still running: not a result yet
    assert main(["results", "--ledger", str(path)]) == 0  # but the command shows it
    table = capsys.readouterr().out
    assert "running" in table and "300" in table and "no evaluations recorded" not in table
    assert Ledger(path).close_interrupted("run-a") == 1
    (row,) = Ledger(path).results()
    assert row["status"] == "failed" and "interrupted" in row["error"]


def test_an_ok_evaluation_keeps_its_per_instance_values_and_its_score_their_interval(tmp_path, capsys):
    from megatron_eval_hook.uncertainty import wilson

    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    ok = ledger.begin("run", 10, "boolq", placement="sync", main_metric="qem", main_split="valid")
    per_instance = [(f"id{i}", float(i % 4 == 0)) for i in range(40)]  # 10 of 40 right
    ledger.finish_ok(ok, [MetricValue("qem", "valid", 0.25, 40), MetricValue("em", "valid", 0.2, 40)], 1.0,
                     [per_instance])  # fmt: skip
    ((kept,),) = ledger.instance_values([ok]).values()  # one HELM run
    assert sorted(kept) == sorted(value for _, value in per_instance)
    main(["results", "--ledger", str(path), "--format", "json", "--all-metrics"])
    rows = {row["metric"]: row for row in json.loads(capsys.readouterr().out)}
    assert (rows["qem"]["ci_low"], rows["qem"]["ci_high"]) == pytest.approx(wilson(10, 40))
    assert rows["qem"]["stderr"] == pytest.approx((0.25 * 0.75 / 39) ** 0.5)
    assert rows["em"]["stderr"] is None  # per-instance values are kept for the main metric only


def test_answer_log_probs_are_kept_per_instance_and_an_older_instances_table_gains_their_columns(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:  # as the table was before answers' log-probs were kept
        db.execute("CREATE TABLE instances (evaluation_id INTEGER NOT NULL, run_index INTEGER NOT NULL,"
                   " instance TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (evaluation_id, run_index, instance))"
                   " WITHOUT ROWID")  # fmt: skip
    ledger = Ledger(path)
    ok = ledger.begin("run", 10, "facts", placement="sync", main_metric="em", main_split="test")
    ledger.finish_ok(
        ok, [MetricValue("em", "test", 0.5, 2)], 1.0, [[("id0", 1.0, -0.5, -2.0), ("id1", 0.0, -3.0, -1.0)]]
    )
    with sqlite3.connect(path) as db:
        kept = db.execute("SELECT instance, value, gold_logprob, wrong_logprob FROM instances ORDER BY instance")
        assert kept.fetchall() == [("id0", 1.0, -0.5, -2.0), ("id1", 0.0, -3.0, -1.0)]


def test_cli_results_json_prints_the_documented_fields(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite"
    fill(Ledger(path))
    assert main(["results", "--ledger", str(path), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    for key in ("run", "iteration", "benchmark", "metric", "value", "status", "error", "started_at", "duration_s",
                "stderr", "ci_low", "ci_high"):  # fmt: skip
        assert key in rows[0]


def test_cli_results_table_and_a_missing_ledger(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite"
    fill(Ledger(path))
    assert main(["results", "--ledger", str(path)]) == 0
    table = capsys.readouterr().out
    assert "boolq" in table and "skipped" in table and "0.5000" in table
    assert main(["results", "--ledger", str(tmp_path / "none.sqlite")]) == 2
    assert "no ledger" in capsys.readouterr().err


def _full_disk(real_connect):
    """sqlite3.connect whose connections fail as SQLite does on a full file system."""

    class Full(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode"):
                raise sqlite3.OperationalError("database or disk is full")
            return super().execute(sql, *args)

    return lambda *args, **kwargs: real_connect(*args, factory=Full, **kwargs)


@pytest.mark.parametrize(
    "problem, reason, fix",
    [
        ("a directory", "it is a directory", "name a file, e.g."),
        ("not SQLite", "it is not a SQLite file", "move this one away"),
        ("unwritable", "it cannot be written", "make its folder writable"),
        ("disk full", "its file system is full", "free space there"),
    ],
)
def test_a_path_that_cannot_hold_the_ledger_is_named_with_why_and_the_fix(tmp_path, monkeypatch, problem, reason, fix):
    path = tmp_path / "ledger.sqlite"
    if problem == "a directory":
        path.mkdir()
    elif problem == "not SQLite":
        path.write_text("step,loss\n1,10.5\n" * 200)
    elif problem == "unwritable":
        path = Path("/proc/ledger.sqlite")  # no one may create files there, root included
    else:
        monkeypatch.setattr(sqlite3, "connect", _full_disk(sqlite3.connect))
    with pytest.raises(LedgerUnusable) as refused:
        Ledger(path)
    message = str(refused.value)
    assert str(path) in message and reason in message and "Fix: " in message and fix in message
    if problem == "not SQLite":
        assert path.read_text().startswith("step,loss")  # left as it was


def test_the_hook_names_the_ledger_key_and_the_cli_the_flag(tmp_path, demo_data, capsys):
    from megatron_eval_hook.config import ConfigError, EvalHookConfig
    from megatron_eval_hook.hook import EvalHook

    config = EvalHookConfig(benchmarks=["boolq"], data_dir=str(demo_data.helm_dir), ledger=str(tmp_path))
    config.wandb.enabled = False
    args = SimpleNamespace(
        eval_hook_config="conf/helm.yaml", save=str(tmp_path / "run"), save_interval=10, train_iters=100,
        seq_length=128, tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
        rank=0, world_size=1, wandb_exp_name=None,
    )  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        EvalHook(config, args)
    assert f"--eval-hook-config conf/helm.yaml: ledger: {tmp_path} cannot hold the ledger" in str(refused.value)
    (tmp_path / "notes.txt").write_text("not a ledger\n" * 100)
    assert main(["results", "--ledger", str(tmp_path / "notes.txt")]) == 2
    assert "megatron-eval results: --ledger " in capsys.readouterr().err
