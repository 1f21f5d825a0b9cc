"""The hook inside Megatron's real training loop (`megatron.training.pretrain`, CPU, gloo)."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from training_runs import (
    FACTS,
    REPO,
    LiveTraining,
    assert_exports_equal_the_checkpoints,
    ok,
    train,
    training_loss,
)
from wandb_offline import read_run, run_files, series

from megatron_eval_hook.ledger import Ledger

pytestmark = pytest.mark.slow


def test_every_scheduled_save_is_evaluated_once_per_benchmark(hooked):
    tmp, _ = hooked
    rows = Ledger(tmp / "eval" / "ledger.sqlite").results()
    evaluated = sorted({(r["iteration"], r["benchmark"]) for r in rows})
    assert evaluated == [(i, b) for i in (3, 6, 7) for b in ("boolq", "broken", "facts")]
    assert len(rows) == len(evaluated)
    for row in rows:
        assert row["duration_s"] > 0 and row["blocked_s"] >= row["duration_s"] and row["placement"] == "sync"


def test_a_failing_benchmark_is_recorded_and_training_goes_on(hooked):
    tmp, result = hooked
    rows = Ledger(tmp / "eval" / "ledger.sqlite").results()
    assert {r["status"] for r in rows if r["benchmark"] == "broken"} == {"failed"}
    assert all("zero instances" in r["error"] for r in rows if r["benchmark"] == "broken")
    assert {r["status"] for r in rows if r["benchmark"] != "broken"} == {"ok"}
    assert "iteration        7/       7" in result.stdout


def test_one_readable_line_per_evaluation(hooked):
    _, result = hooked
    lines = [line for line in result.stdout.splitlines() if line.startswith("[eval-hook] iteration")]
    assert [line.split(":")[0] for line in lines] == [f"[eval-hook] iteration {i}" for i in (3, 6, 7)]
    assert "boolq" in lines[0] and "training blocked" in lines[0]


def test_scores_are_in_the_training_runs_wandb_against_the_iteration(hooked):
    tmp, _ = hooked
    (path,) = run_files(tmp / "wandb")  # one run: Megatron's, holding both the loss and the scores
    run = read_run(path)
    assert [step for step, _ in series(run, "lm loss")] == list(range(1, 8))
    facts = series(run, "eval/facts/exact_match", x="eval/iteration")
    assert [iteration for iteration, _ in facts] == [3, 6, 7]
    assert [i for i, _ in series(run, "eval/blocked_s", x="eval/iteration")] == [3, 6, 7]
    assert run["metrics"].get("eval/*") == "eval/iteration"
    stderr = series(run, "eval/facts/exact_match_stderr", x="eval/iteration")
    assert [i for i, _ in stderr] == [3, 6, 7] and all(0.0 <= value <= 0.5 for _, value in stderr)


def test_scores_are_in_megatrons_tensorboard_events_at_the_iteration(hooked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _ = hooked
    events = EventAccumulator(str(tmp / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert "lm loss" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("eval/facts/exact_match")] == [3, 6, 7]
    assert [e.step for e in events.Scalars("eval/blocked_s")] == [3, 6, 7]


def test_training_with_the_hook_is_bit_identical_to_training_without(hooked, demo_data, tmp_path):
    tmp, _ = hooked
    plain = tmp_path / "plain"
    ok(train(plain, demo_data, iterations=7, save_interval=3))
    assert training_loss(tmp) == training_loss(plain)


def test_data_parallel_ranks_wait_for_the_evaluating_rank(demo_data, tmp_path):
    result = ok(train(tmp_path, demo_data, iterations=4, save_interval=2, nproc=2, hook=["benchmarks=[boolq]"]))
    rows = Ledger(tmp_path / "eval" / "ledger.sqlite").results()
    assert [(r["iteration"], r["benchmark"], r["status"]) for r in rows] == [(2, "boolq", "ok"), (4, "boolq", "ok")]
    assert result.stdout.count("[eval-hook] iteration 2:") == 1


def test_a_config_mistake_stops_the_job_before_the_first_iteration_said_once_and_last(demo_data, tmp_path):
    """Two ranks refuse; the block (what, where from, the fix) comes once, as torchrun's root cause at the end of
    its output, with no traceback of the hook's."""
    result = train(tmp_path, demo_data, iterations=2, save_interval=2, nproc=2, hook=["schedule.evry=3"])
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "iteration        1/" not in result.stdout
    assert output.count("megatron_eval_hook: training not started.") == 1
    root_cause = result.stderr[result.stderr.rindex("Root Cause") :]
    assert "megatron_eval_hook: training not started." in root_cause and "schedule.evry" in root_cause
    assert "Fix:" in root_cause and "exitcode  : 2" in root_cause
    assert f'File "{REPO / "megatron_eval_hook"}' not in output  # no traceback through the hook


def test_the_launcher_installs_the_hook_in_an_unmodified_script(demo_data, tmp_path):
    result = ok(
        train(
            tmp_path,
            demo_data,
            iterations=2,
            save_interval=2,
            hook=["benchmarks=[boolq]"],
            script=REPO / "tests" / "stock_pretrain.py",
            launcher=True,
        )
    )
    rows = Ledger(tmp_path / "eval" / "ledger.sqlite").results()
    assert [(r["iteration"], r["status"]) for r in rows] == [(2, "ok")]
    assert "[eval-hook] installed" in result.stdout


def test_without_a_megatron_wandb_run_the_scores_go_to_a_run_of_the_hooks_own(demo_data, tmp_path):
    ok(train(tmp_path, demo_data, iterations=4, save_interval=2, hook=["benchmarks=[boolq]"], megatron_wandb=False))
    (path,) = run_files(tmp_path / "eval")  # wandb.dir defaults to the hook's output_dir
    run = read_run(path)
    assert run["exited"]  # finished when the training process ended
    scores = series(run, "eval/boolq/quasi_exact_match", x="eval/iteration")
    assert [iteration for iteration, _ in scores] == [2, 4]
    assert series(run, "eval/boolq/quasi_exact_match") == scores  # its own steps are the iterations


def test_an_exported_checkpoint_scores_prompts_as_the_hook_did(hooked, tmp_path):
    import json

    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from megatron_eval_hook.cli import main

    tmp, _ = hooked
    assert main(["export-hf", "--checkpoint", str(tmp / "checkpoints"), "--out", str(tmp_path / "hf")]) == 0
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    (state_file,) = (tmp / "eval" / "helm" / "runs" / "iter_0000007").glob(
        "mmlu:subject=demo_facts*/scenario_state.json"
    )
    for state in json.loads(state_file.read_text())["request_states"][:8]:
        prompt, hook_tokens = state["request"]["prompt"], state["result"]["completions"][0]["tokens"]
        ids = tokenizer(prompt)["input_ids"]
        assert len(ids) == len(hook_tokens)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        exported = [0.0] + [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
        answer = state["instance"]["references"][state["reference_index"]]["output"]["text"]
        read = len(tokenizer(f" {answer}")["input_ids"])  # the answer's tokens: all HELM reads, all the hook computes
        hooked_logprobs = [t["logprob"] for t in hook_tokens]
        assert torch.allclose(torch.tensor(exported[-read:]), torch.tensor(hooked_logprobs[-read:]), atol=1e-4)


def test_each_evaluated_save_is_exported_from_memory_as_its_checkpoint(hooked, tmp_path):
    tmp, result = hooked
    assert_exports_equal_the_checkpoints(tmp, [3, 6, 7], tmp_path)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("[eval-hook] iteration 3:")]
    assert f"weights in {tmp / 'hf' / 'iter_0000003'} (" in line  # the evaluation's one readable line


def test_a_job_restarted_from_its_checkpoint_logs_into_the_same_wandb_run(hooked, demo_data, tmp_path):
    run, _ = hooked
    shutil.copytree(run, tmp_path, symlinks=True, dirs_exist_ok=True)  # the first job: 7 iterations
    hook = [f"benchmarks=[boolq,'{FACTS}']"]
    # extended to 10 iterations: the learning-rate schedule follows the new --train-iters
    resumed = ["--load", str(tmp_path / "checkpoints"), "--override-opt-param-scheduler"]
    ok(train(tmp_path, demo_data, iterations=10, save_interval=3, hook=hook, extra=resumed))

    first, second = (read_run(path) for path in run_files(tmp_path / "wandb"))  # offline: one file per job
    assert first["id"] == second["id"] == (tmp_path / "eval" / "wandb_run_id").read_text().strip()
    assert [step for step, _ in series(second, "lm loss")] == [8, 9, 10]
    curve = [i for job in (first, second) for i, _ in series(job, "eval/facts/exact_match", x="eval/iteration")]
    assert curve == [3, 6, 7, 9, 10]


def faulty_run(tmp_path, demo_data, faults: dict[str, int], iterations: int, *hook: str):
    """A run of `iterations` saving at each, with `faults` (site -> iteration) injected; its ledger rows by
    iteration, and its output."""
    result = ok(
        train(
            tmp_path, demo_data, iterations=iterations, save_interval=1, hook=[f"benchmarks=['{FACTS}']", *hook],
            script=REPO / "tests" / "faulty_pretrain.py",
            environment={"EVAL_HOOK_FAULTS": ",".join(f"{site}@{i}" for site, i in faults.items())},
        )
    )  # fmt: skip
    assert f"iteration        {iterations}/       {iterations}" in result.stdout
    rows = {r["iteration"]: r for r in Ledger(tmp_path / "eval" / "ledger.sqlite").results()}
    return rows, result.stdout + result.stderr


def test_a_fault_at_any_of_the_hooks_call_sites_never_stops_training(demo_data, tmp_path):
    """Each save of one real run breaks another part of the hook's save path (tests/faulty_pretrain.py); training
    reaches its last iteration, and the ledger says what happened as soon as it can take it."""
    faults = {"ledger": 1, "wandb": 2, "tensorboard": 3, "helm": 4, "engine": 5}  # and none at 6
    rows, output = faulty_run(tmp_path, demo_data, faults, 6)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    # a full disk at the save: its failure is recorded at the next save, when the ledger can take it
    assert rows[1]["status"] == "failed" and "database or disk is full" in rows[1]["error"]
    assert "the ledger cannot record that evaluation" in output
    for iteration in (2, 3, 6):  # a sink failing loses nothing: the ledger holds the scores
        assert rows[iteration]["status"] == "ok" and rows[iteration]["blocked_s"] is not None
    # W&B failed at the save of 2: its score was logged again at a later training step, at its own iteration, once
    runs = [read_run(path) for path in run_files(tmp_path)]
    logged = [point for run in runs for point in series(run, "eval/facts/exact_match", x="eval/iteration")]
    assert sorted(i for i, _ in logged) == [2, 3, 6]
    assert rows[4]["status"] == "failed" and "injected: HELM failed" in rows[4]["error"]
    assert rows[5]["status"] == "failed" and "injected: the engine failed" in rows[5]["error"]


def test_under_the_async_placement_a_failed_snapshot_or_sink_never_stops_training(demo_data, tmp_path):
    rows, _ = faulty_run(tmp_path, demo_data, {"snapshot": 1, "wandb": 2}, 3, "placement=async", "pending_policy=all")
    assert sorted(rows) == [1, 2, 3]
    assert rows[1]["status"] == "failed"
    assert "the snapshot of the weights could not be copied: MemoryError: injected" in rows[1]["error"]
    assert rows[2]["status"] == rows[3]["status"] == "ok"
    runs = [read_run(path) for path in run_files(tmp_path)]
    logged = [point for run in runs for point in series(run, "eval/facts/exact_match", x="eval/iteration")]
    assert sorted(i for i, _ in logged) == [2, 3]  # W&B failing on 2 lost nothing, and logged nothing twice


def running_at(ledger: Path, iteration: int) -> bool:
    """Whether an evaluation of `iteration` is in progress (its ledger rows opened, not closed)."""
    if not ledger.is_file():
        return False
    query = "SELECT COUNT(*) FROM evaluations WHERE iteration = ? AND status = 'running'"
    try:
        with sqlite3.connect(ledger, timeout=5.0) as db:
            return db.execute(query, (iteration,)).fetchone()[0] > 0
    except sqlite3.OperationalError:  # the hook is creating it
        return False


def test_a_job_killed_during_an_evaluation_evaluates_that_save_when_resumed(demo_data, tmp_path):
    """SIGKILL of torchrun's whole process tree while the save of iteration 2 is evaluated; the job restarted
    from that checkpoint evaluates it before its first iteration: every save ends with one ok result per
    benchmark, in the ledger and in W&B, without backfill."""
    hook = [f"benchmarks=[boolq,'{FACTS}']"]
    training = LiveTraining(tmp_path, demo_data, iterations=4, save_interval=2, hook=hook)
    training.wait_for(lambda: running_at(tmp_path / "eval" / "ledger.sqlite", 2), "the evaluation of iteration 2")
    training.kill_tree()
    resumed = ok(train(tmp_path, demo_data, iterations=4, save_interval=2, hook=hook,
                       extra=["--load", str(tmp_path / "checkpoints")]))  # fmt: skip
    assert "iteration 2 (resumed from): evaluating ['boolq', 'facts']" in resumed.stdout

    rows = Ledger(tmp_path / "eval" / "ledger.sqlite").results()
    ok_rows = sorted((r["iteration"], r["benchmark"]) for r in rows if r["status"] == "ok")
    assert ok_rows == [(2, "boolq"), (2, "facts"), (4, "boolq"), (4, "facts")]  # each once
    interrupted = [r for r in rows if r["status"] == "failed"]
    assert interrupted and all(r["iteration"] == 2 and "interrupted" in r["error"] for r in interrupted)
    evaluated_first = resumed.stdout.index("iteration 2 (resumed from)")
    assert evaluated_first < resumed.stdout.index("iteration        3/")  # before training went on
    runs = [read_run(path) for path in run_files(tmp_path / "wandb")]
    logged = [point for run in runs for point in series(run, "eval/facts/exact_match", x="eval/iteration")]
    assert sorted(i for i, _ in logged) == [2, 4]


def resume(tmp: Path) -> list[str]:
    """Megatron's arguments to resume from `tmp/checkpoints`, to a later --train-iters than the first job's."""
    return ["--load", str(tmp / "checkpoints"), "--override-opt-param-scheduler"]


def ok_rows(ledger: Path) -> list[tuple[int, str]]:
    return sorted((r["iteration"], r["benchmark"]) for r in Ledger(ledger).results() if r["status"] == "ok")


def logged_iterations(folder: Path, key: str = "eval/facts/exact_match") -> list[int]:
    """The iterations at which the offline W&B runs under `folder` hold `key`, once per point logged."""
    runs = [read_run(path) for path in run_files(folder)]
    return sorted(i for run in runs for i, _ in series(run, key, x="eval/iteration"))


def test_a_restarted_job_evaluates_each_earlier_save_that_lacks_results_before_iteration_1(demo_data, tmp_path):
    """Saves 1 and 2 failed (HELM, the engine); the job restarted from 3 reads each into the training model with
    Megatron's loading and evaluates it before iteration 4, then goes on from 3 exactly as a job without the
    hook does."""
    faulty_run(tmp_path, demo_data, {"helm": 1, "engine": 2}, 3)
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path / "checkpoints", plain / "checkpoints")
    resumed = ok(train(tmp_path, demo_data, iterations=4, save_interval=1, hook=[f"benchmarks=['{FACTS}']"],
                       extra=resume(tmp_path)))  # fmt: skip

    assert "resuming: 2 earlier save(s) lack results (iterations [1, 2])" in resumed.stdout
    assert ok_rows(tmp_path / "eval" / "ledger.sqlite") == [(1, "facts"), (2, "facts"), (3, "facts"), (4, "facts")]
    for iteration in (1, 2):
        line = f"[eval-hook] iteration {iteration}: facts "
        assert resumed.stdout.index(line) < resumed.stdout.index("iteration        4/")
    assert logged_iterations(tmp_path / "wandb") == [1, 2, 3, 4]  # each score once

    ok(
        train(
            plain,
            demo_data,
            iterations=4,
            save_interval=1,
            extra=resume(plain),
        )
    )
    runs = [read_run(path) for path in run_files(tmp_path / "wandb")]
    (resumed_loss,) = [series(run, "lm loss") for run in runs if [s for s, _ in series(run, "lm loss")] == [4]]
    assert resumed_loss == training_loss(plain)  # the earlier saves' weights left nothing behind


@pytest.mark.parametrize("placement", ["sync", "async"])
def test_a_job_killed_right_after_an_evaluation_neither_repeats_nor_loses_it(demo_data, tmp_path, placement):
    """SIGKILL of the whole job once the ledger holds the save of 2 as ok, while its scores are on their way to
    W&B (the W&B sink hangs): the restarted job does not evaluate it again, and logs its score into W&B, once."""
    hook = [f"benchmarks=['{FACTS}']", f"placement={placement}"]
    ledger = tmp_path / "eval" / "ledger.sqlite"
    training = LiveTraining(tmp_path, demo_data, iterations=4, save_interval=2, hook=hook,
                            script=REPO / "tests" / "faulty_pretrain.py",
                            environment={"EVAL_HOOK_FAULTS": "wandb-hangs@2"})  # fmt: skip
    training.wait_for(lambda: ledger.is_file() and (2, "facts") in ok_rows(ledger), "the evaluation of iteration 2")
    training.kill_tree()
    resumed = ok(train(tmp_path, demo_data, iterations=4, save_interval=2, hook=hook,
                       extra=resume(tmp_path)))  # fmt: skip
    assert not re.search(r"iteration 2 \(.*lacks", resumed.stdout)  # (4 may: async, it could be saved unevaluated)
    assert ok_rows(ledger) == [(2, "facts"), (4, "facts")]
    assert logged_iterations(tmp_path / "wandb") == [2, 4]


def test_under_async_a_killed_jobs_saves_are_evaluated_from_their_checkpoints_in_the_eval_process(demo_data, tmp_path):
    """The snapshot of 1 failed; the job is killed while its eval process evaluates 2. The restarted job hands
    every save that lacks results to its eval process, which reads them from disk while training goes on."""
    hook = [f"benchmarks=['{FACTS}']", "placement=async", "pending_policy=all"]
    ledger = tmp_path / "eval" / "ledger.sqlite"
    training = LiveTraining(tmp_path, demo_data, iterations=3, save_interval=1, hook=hook,
                            script=REPO / "tests" / "faulty_pretrain.py",
                            environment={"EVAL_HOOK_FAULTS": "snapshot@1"})  # fmt: skip
    training.wait_for(lambda: running_at(ledger, 2), "the evaluation of iteration 2")
    training.kill_tree()
    resumed = ok(train(tmp_path, demo_data, iterations=4, save_interval=1, hook=hook,
                       extra=resume(tmp_path)))  # fmt: skip

    assert "(saved before the one resumed from): ['facts'], which it lacks, evaluated from its checkpoint" in (
        resumed.stdout
    )
    assert ok_rows(ledger) == [(1, "facts"), (2, "facts"), (3, "facts"), (4, "facts")]
    assert logged_iterations(tmp_path / "wandb") == [1, 2, 3, 4]
