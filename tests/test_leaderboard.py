"""The leaderboard: chance-corrected composite, missing benchmarks, iteration picks, formats, W&B."""

from __future__ import annotations

import csv
import io
import json

import pytest
from ledger_views import BASELINES, BETA, filled_ledger, summary_table

from megatron_eval_hook.cli import main
from megatron_eval_hook.leaderboard import (
    Chance,
    LeaderboardError,
    build_leaderboard,
    chance_level,
    composite,
    parse_chance,
    to_markdown,
)
from megatron_eval_hook.ledger import Ledger


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(filled_ledger(tmp_path / "ledger.sqlite"))


def rows_by_name(board) -> dict:
    return {row.entry.name: row for row in board.rows}


@pytest.mark.parametrize(
    ("benchmark", "metric", "level"),
    [
        ("mmlu", "exact_match", 0.25),
        ("mmlu:subject=anatomy,method=multiple_choice_joint", "exact_match", 0.25),
        ("hellaswag", "exact_match", 0.25),
        ("boolq", "quasi_exact_match", 0.5),
        ("narrative_qa", "f1_score", 0.0),
        ("narrative_qa", "exact_match", 0.0),
        ("my_facts", "f1_score", 0.0),
    ],
)
def test_the_random_guess_level_comes_from_the_benchmarks_helm_scenario(benchmark, metric, level):
    assert chance_level(benchmark, metric).level == pytest.approx(level)


def test_a_benchmark_of_unknown_scenario_is_taken_at_chance_0_and_says_so():
    chance = chance_level("facts", "exact_match")
    assert chance.level == 0.0 and "--chance" in chance.reason


def test_the_composite_is_the_mean_of_chance_corrected_rescaled_scores():
    chance = {"mmlu": Chance(0.25, ""), "boolq": Chance(0.5, ""), "narrative_qa": Chance(0.0, "")}
    scores = {"mmlu": 0.4, "boolq": 0.7, "narrative_qa": 0.3}
    assert composite(scores, chance) == pytest.approx(((0.4 - 0.25) / 0.75 + (0.7 - 0.5) / 0.5 + 0.3) / 3)
    assert composite({"mmlu": 0.1}, chance) == pytest.approx(-0.2)  # below chance is negative
    assert composite({}, chance) is None


def test_equal_scores_everywhere_rank_without_dividing_by_zero(tmp_path):
    rows = [
        {
            "run": run,
            "iteration": 10,
            "benchmark": "boolq",
            "metric": "quasi_exact_match",
            "value": 0.5,
            "status": "ok",
            "main": True,
            "tokens": None,
        }
        for run in ("a", "b")
    ]
    board = build_leaderboard(rows)
    assert [row.composite for row in board.rows] == [0.0, 0.0]


def test_latest_pick_takes_each_runs_last_scored_iteration_and_shows_missing_benchmarks_as_missing(ledger):
    board = build_leaderboard(ledger.results(), ledger.baselines())
    assert board.benchmarks == ("mmlu", "boolq", "narrative_qa", "hellaswag")
    alpha = rows_by_name(board)["alpha"]
    assert alpha.entry.iteration == 300 and alpha.entry.tokens == 300 * 4096
    assert dict(alpha.entry.scores) == {"mmlu": 0.35, "boolq": 0.8}  # narrative_qa failed at 300: missing, not 0
    assert alpha.over == ("mmlu", "boolq") and board.is_partial(alpha)
    assert alpha.composite == pytest.approx(((0.35 - 0.25) / 0.75 + (0.8 - 0.5) / 0.5) / 2)
    record = next(r for r in board.to_json()["rows"] if r["name"] == "alpha")
    assert record["scores"]["narrative_qa"] is None and record["partial"] is True
    assert record["composite_over"] == ["mmlu", "boolq"]


def test_best_pick_prefers_the_iteration_with_most_benchmarks_then_the_highest_composite(ledger):
    alpha = rows_by_name(build_leaderboard(ledger.results(), pick="best"))["alpha"]
    assert (
        alpha.entry.iteration == 200
        and len(alpha.over) == 3
        and alpha.composite == pytest.approx(((0.4 - 0.25) / 0.75 + (0.7 - 0.5) / 0.5 + 0.3) / 3)
    )


def test_baselines_are_ranked_beside_the_runs_on_the_metric_the_runs_use(ledger):
    board = build_leaderboard(ledger.results(), ledger.baselines())
    assert [(r.entry.name, r.entry.kind) for r in board.rows] == [
        ("alpha", "run"),  # ((0.35 - 0.25) / 0.75 + (0.8 - 0.5) / 0.5) / 2 = 0.367
        (BETA, "run"),  # ((0.5 - 0.25) / 0.75 + 0) / 2 = 0.167
        ("bloom-560m", "baseline"),  # ((0.55 - 0.5) / 0.5 + (0.32 - 0.25) / 0.75) / 2 = 0.097
        ("pythia-160m", "baseline"),  # (0.26 - 0.25) / 0.75 = 0.013
    ]
    assert [r.rank for r in board.rows] == [1, 2, 3, 4]
    pythia = rows_by_name(board)["pythia-160m"]
    assert pythia.entry.tokens == BASELINES[0].tokens and pythia.entry.scores == {"mmlu": 0.26}


def test_runs_keeps_only_the_named_runs_and_an_unknown_run_names_the_known_ones(ledger):
    board = build_leaderboard(ledger.results(), runs=[BETA])
    assert [r.entry.name for r in board.rows] == [BETA]
    with pytest.raises(LeaderboardError) as error:
        build_leaderboard(ledger.results(), runs=["gamma"], source="the ledger x.sqlite")
    assert "'gamma'" in str(error.value) and "x.sqlite" in str(error.value) and "alpha" in str(error.value)


@pytest.mark.parametrize("item", ["facts", "facts=1", "facts=high", "=0.2"])
def test_a_bad_chance_override_is_refused_with_the_fix(item):
    with pytest.raises(LeaderboardError, match="Fix:"):
        parse_chance([item])


def test_the_composites_standard_error_carries_each_scores_through_the_chance_correction(ledger):
    from megatron_eval_hook.uncertainty import Z95, of_values

    board = build_leaderboard(ledger.results(), ledger.baselines(), pick="latest")
    alpha = rows_by_name(board)["alpha"]  # at 300: mmlu 0.35 and boolq 0.8, of 20 instances each
    mmlu = of_values([1.0] * 7 + [0.0] * 13).stderr
    boolq = of_values([1.0] * 16 + [0.0] * 4).stderr
    expected = ((mmlu / 0.75) ** 2 + (boolq / 0.5) ** 2) ** 0.5 / 2
    assert alpha.composite_se == pytest.approx(expected)
    record = next(r for r in board.to_json()["rows"] if r["name"] == "alpha")
    assert record["composite_ci"] == pytest.approx([alpha.composite - Z95 * expected, alpha.composite + Z95 * expected])
    assert rows_by_name(board)["pythia-160m"].composite_se is None  # published baselines carry no error


def test_markdown_marks_partial_rows_and_explains_the_composite(ledger):
    text = to_markdown(build_leaderboard(ledger.results(), ledger.baselines()))
    assert (
        "| rank | name | kind | iteration | tokens | mmlu | boolq | narrative_qa | hellaswag | composite | ± se "
        "| over |" in text
    )
    assert "2/4*" in text and "chance levels: mmlu 0.25" in text and "not counted as 0" in text


def test_cli_leaderboard_json_and_csv(tmp_path, ledger, capsys):
    assert main(["leaderboard", "--ledger", str(ledger.path), "--format", "json"]) == 0
    board = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in board["benchmarks"]] == ["mmlu", "boolq", "narrative_qa", "hellaswag"]
    assert board["benchmarks"][1]["chance"] == 0.5 and board["rows"][0]["name"] == "alpha"
    assert main(["leaderboard", "--ledger", str(ledger.path), "--format", "csv", "--pick", "best"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert table[0]["name"] == "alpha" and table[0]["iteration"] == "200" and table[0]["tokens"] == str(200 * 4096)
    assert table[0]["hellaswag"] == "" and table[0]["over"] == "3/4*"


def test_cli_leaderboard_errors_name_the_value_and_the_fix(tmp_path, ledger, capsys):
    assert main(["leaderboard", "--ledger", str(tmp_path / "none.sqlite")]) == 2
    error = capsys.readouterr().err
    assert "none.sqlite" in error and "Fix:" in error
    assert not (tmp_path / "none.sqlite").exists()
    assert main(["leaderboard", "--ledger", str(ledger.path), "--runs", "gamma"]) == 2
    assert "'gamma'" in capsys.readouterr().err


def test_cli_leaderboard_logs_a_wandb_table(tmp_path, ledger, capsys):
    assert main(["leaderboard", "--ledger", str(ledger.path), "--wandb", "--wandb-project", "test-board"]) == 0
    (folder,) = (tmp_path / "wandb").rglob("offline-run-*")
    table = summary_table(folder, "leaderboard")
    assert table["columns"] == [
        "rank",
        "name",
        "kind",
        "iteration",
        "tokens",
        "mmlu",
        "boolq",
        "narrative_qa",
        "hellaswag",
        "composite",
        "± se",
        "over",
    ]
    assert [row[1] for row in table["data"]] == ["alpha", BETA, "bloom-560m", "pythia-160m"]
    assert table["data"][0][3:6] == [300, 300 * 4096, 0.35]
