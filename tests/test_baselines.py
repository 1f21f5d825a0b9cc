"""Baselines: the shipped file, its checks, and `megatron-eval baselines` into the ledger and W&B."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from ledger_views import summary_table, summary_values

from megatron_eval_hook.baselines import BaselinesError, load_baselines
from megatron_eval_hook.cli import main
from megatron_eval_hook.ledger import BaselineScore, Ledger

SHIPPED = Path(__file__).resolve().parents[1] / "conf" / "baselines.yaml"
DEFAULT_PRESET_METRICS = {
    ("mmlu", "exact_match"),
    ("boolq", "quasi_exact_match"),
    ("narrative_qa", "f1_score"),
    ("hellaswag", "exact_match"),
}


def by_name(score: BaselineScore) -> tuple[str, str, str]:
    return score.model, score.benchmark, score.metric


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "baselines.yaml"
    path.write_text(text)
    return path


def test_the_shipped_baselines_cite_a_source_and_use_the_default_presets_main_metrics():
    scores = load_baselines(SHIPPED)
    assert {"gpt2-124m", "pythia-160m", "opt-125m"} <= {s.model for s in scores}
    for score in scores:
        assert (score.benchmark, score.metric) in DEFAULT_PRESET_METRICS
        assert score.source and score.source.startswith("https://")
        assert score.source in SHIPPED.read_text()


def test_a_score_written_as_a_percentage_is_refused_naming_the_file_the_key_and_the_fix(tmp_path):
    path = write(tmp_path, "baselines:\n  - model: m\n    scores:\n      mmlu: {exact_match: 27.1}\n")
    with pytest.raises(BaselinesError) as error:
        load_baselines(path)
    message = str(error.value)
    assert str(path) in message and "baselines[0]" in message and "mmlu.exact_match" in message
    assert "27.1" in message and "Fix:" in message and "0.271" in message


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("baselines: [\n", ["not valid YAML", "line"]),
        ("models: []\n", ["`baselines`", "Fix:"]),
        ("baselines:\n  - model: m\n", ["scores", "Fix:"]),
        ("baselines:\n  - model: m\n    tokens: lots\n    scores: {mmlu: {exact_match: 0.3}}\n", ["tokens", "'lots'"]),
        ("baselines:\n  - model: m\n    score: {mmlu: {exact_match: 0.3}}\n", ["unknown keys", "'score'"]),
        (
            "baselines:\n  - {model: m, scores: {mmlu: {em: 0.3}}}\n  - {model: m, scores: {boolq: {em: 0.6}}}\n",
            ["'m'", "twice"],
        ),
    ],
)
def test_a_malformed_baselines_file_says_what_is_wrong_and_how_to_fix_it(tmp_path, text, names):
    with pytest.raises(BaselinesError) as error:
        load_baselines(write(tmp_path, text))
    for name in names:
        assert name in str(error.value)


def test_cli_records_the_baselines_once_however_often_it_runs(tmp_path, capsys):
    ledger = tmp_path / "ledger.sqlite"
    for _ in range(2):
        assert main(["baselines", "--config", str(SHIPPED), "--ledger", str(ledger), "--no-wandb"]) == 0
    assert Ledger(ledger).baselines() == sorted(load_baselines(SHIPPED), key=by_name)
    assert "recorded" in capsys.readouterr().out


def test_recording_a_model_again_replaces_its_scores(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.record_baselines([BaselineScore("m", "mmlu", "exact_match", 0.3), BaselineScore("n", "boolq", "qem", 0.6)])
    ledger.record_baselines([BaselineScore("m", "boolq", "qem", 0.7, 1000, "paper")])
    assert ledger.baselines() == [
        BaselineScore("m", "boolq", "qem", 0.7, 1000, "paper"),
        BaselineScore("n", "boolq", "qem", 0.6),
    ]


def test_a_ledger_written_before_baselines_existed_still_opens(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE evaluations (id INTEGER PRIMARY KEY, run TEXT NOT NULL, iteration INTEGER NOT NULL,"
            " benchmark TEXT NOT NULL, status TEXT NOT NULL, error TEXT, started_at TEXT NOT NULL, duration_s REAL,"
            " blocked_s REAL, placement TEXT, tokens INTEGER, main_metric TEXT, main_split TEXT);"
            "INSERT INTO evaluations (run, iteration, benchmark, status, error, started_at)"
            " VALUES ('old', 10, 'boolq', 'skipped', 'exit signal', '2025-01-01T00:00:00');"
        )
    ledger = Ledger(path)
    assert ledger.baselines() == []
    assert [r["run"] for r in ledger.results()] == ["old"]
    ledger.record_baselines([BaselineScore("m", "boolq", "qem", 0.6)])
    assert len(ledger.baselines()) == 1


def test_cli_logs_the_baselines_as_a_wandb_table(tmp_path, capsys):
    assert main(["baselines", "--config", str(SHIPPED), "--wandb-project", "test-baselines"]) == 0
    (folder,) = (tmp_path / "wandb").rglob("offline-run-*")
    table = summary_table(folder, "baselines")
    assert table["columns"] == ["model", "benchmark", "metric", "value", "tokens", "source"]
    expected = [[s.model, s.benchmark, s.metric, s.value, s.tokens, s.source] for s in load_baselines(SHIPPED)]
    assert sorted(table["data"], key=lambda row: row[:3]) == sorted(expected, key=lambda row: row[:3])
    assert summary_values(folder)["baseline/pythia-160m/mmlu/exact_match"] == pytest.approx(0.2599)
    assert "test-baselines" in capsys.readouterr().out


def test_cli_baselines_errors_name_the_file_and_the_fix(tmp_path, capsys):
    assert main(["baselines", "--config", str(tmp_path / "missing.yaml"), "--no-wandb", "--ledger", "x"]) == 2
    error = capsys.readouterr().err
    assert "missing.yaml" in error and "no such file" in error and "Fix:" in error
    assert main(["baselines", "--config", str(SHIPPED), "--no-wandb"]) == 2
    assert "nowhere to record" in capsys.readouterr().err
