"""The async placement inside Megatron's real training loop (CPU, gloo): training waits only for the
weight copy; an eval process of its own evaluates, and is watched.

Pressure is put on the eval process from outside, as an operator or the kernel would: SIGSTOP makes
it slower than training (or hang), SIGKILL kills it."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from training_runs import (
    BENCHMARKS,
    HOOKED_BENCHMARKS,
    LLAMA,
    LiveTraining,
    assert_exports_equal_the_checkpoints,
    backfill,
    data_with_a_broken_benchmark,
    ok,
    scores,
    statuses,
    train,
    training_loss,
)
from wandb_offline import read_run, run_files, series

from megatron_eval_hook.ledger import Ledger

pytestmark = pytest.mark.slow

ASYNC = ["placement=async", BENCHMARKS]


def ledger_rows(tmp) -> list[dict]:
    return Ledger(tmp / "eval" / "ledger.sqlite").results()


@pytest.fixture(scope="module")
def async_hooked(demo_data, tmp_path_factory):
    """The `hooked` run (7 iterations, saves at 3, 6, 7 evaluated on boolq, facts and a broken benchmark)
    with the async placement, every snapshot evaluated."""
    data_dir = data_with_a_broken_benchmark(demo_data, tmp_path_factory.mktemp("data"))
    tmp = tmp_path_factory.mktemp("async-hooked")
    hook = [HOOKED_BENCHMARKS, f"data_dir={data_dir}", "schedule.every=3", "placement=async", "pending_policy=all"]
    hook.append(f"export_hf={tmp / 'hf'}")
    return tmp, ok(train(tmp, demo_data, iterations=7, save_interval=3, hook=hook))


def test_async_scores_equal_the_sync_placements_for_the_same_checkpoints(async_hooked, hooked):
    tmp, _ = async_hooked
    sync_tmp, _ = hooked
    async_scores = scores(tmp / "eval" / "ledger.sqlite")
    assert {key[0] for key in async_scores} == {3, 6, 7}
    assert async_scores == scores(sync_tmp / "eval" / "ledger.sqlite")
    assert statuses(tmp / "eval" / "ledger.sqlite") == statuses(sync_tmp / "eval" / "ledger.sqlite")
    assert {r["placement"] for r in ledger_rows(tmp)} == {"async"}


def test_each_evaluated_snapshot_is_exported_as_the_checkpoint_saved_with_it(async_hooked, tmp_path):
    tmp, _ = async_hooked
    assert_exports_equal_the_checkpoints(tmp, [3, 6, 7], tmp_path)


def test_training_loss_is_identical_with_and_without_async_evaluation(async_hooked, demo_data, tmp_path):
    tmp, _ = async_hooked
    ok(train(tmp_path, demo_data, iterations=7, save_interval=3))
    assert training_loss(tmp) == training_loss(tmp_path)


def test_async_scores_are_in_the_training_runs_wandb_and_tensorboard(async_hooked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _ = async_hooked
    (path,) = run_files(tmp / "wandb")  # Megatron's run, the loss beside the late scores
    run = read_run(path)
    assert [step for step, _ in series(run, "lm loss")] == list(range(1, 8))
    assert [i for i, _ in series(run, "eval/facts/exact_match", x="eval/iteration")] == [3, 6, 7]
    blocked = series(run, "eval/blocked_s", x="eval/iteration")
    assert [i for i, _ in blocked] == [3, 6, 7] and all(seconds >= 0 for _, seconds in blocked)
    events = EventAccumulator(str(tmp / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("eval/facts/exact_match")] == [3, 6, 7]


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param([], id="DP=2"),  # rank 0 holds the only main replicas, the last rank none
        pytest.param(["--tensor-model-parallel-size", "2"], id="TP=2"),
        pytest.param(["--pipeline-model-parallel-size", "2"], id="PP=2"),
        pytest.param(["--tensor-model-parallel-size", "2", *LLAMA], id="Llama-style TP=2"),  # SwiGLU's fc1 halves
    ],
)
def test_shards_of_two_ranks_are_assembled_into_the_checkpoints_model(layout, demo_data, tmp_path, monkeypatch):
    hooked = tmp_path / "hooked"
    run = dict(iterations=4, save_interval=2, nproc=2, extra=layout)
    ok(train(hooked, demo_data, hook=[*ASYNC, "pending_policy=all"], **run))
    assert statuses(hooked / "eval" / "ledger.sqlite") == [(i, b, "ok") for i in (2, 4) for b in ("boolq", "facts")]

    # the same checkpoints, read from disk and evaluated by the sync evaluation path
    monkeypatch.chdir(demo_data.root)
    assert backfill(hooked / "checkpoints", tmp_path / "backfill", demo_data) == 0
    assert scores(hooked / "eval" / "ledger.sqlite") == scores(tmp_path / "backfill" / "ledger.sqlite")

    plain = tmp_path / "plain"
    ok(train(plain, demo_data, **run))
    assert training_loss(hooked) == training_loss(plain)


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def test_latest_policy_replaces_a_waiting_snapshot_and_records_it_skipped(demo_data, tmp_path):
    training = LiveTraining(tmp_path, demo_data, iterations=10, save_interval=1, hook=ASYNC)
    (worker,) = training.wait_for(training.eval_processes, "eval process")
    training.wait_for(lambda: training.saved(1), "save 1")
    stop(worker)  # evaluation is now slower than training
    training.wait_for(lambda: training.saved(6), "save 6")
    resume(worker)
    training.finish()

    rows = ledger_rows(tmp_path)
    assert sorted({r["iteration"] for r in rows}) == list(range(1, 11))  # every save is accounted for
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len({r["iteration"] for r in skipped}) >= 3
    assert all("replaced by the snapshot of iteration" in r["error"] for r in skipped)
    assert {r["status"] for r in rows if r["iteration"] == 10} == {"ok"}  # the last save is never replaced
    assert {r["status"] for r in rows} == {"ok", "skipped"}


def test_all_policy_makes_training_wait_for_room_and_logs_the_wait(demo_data, tmp_path):
    training = LiveTraining(tmp_path, demo_data, iterations=6, save_interval=1, hook=[*ASYNC, "pending_policy=all"])
    (worker,) = training.wait_for(training.eval_processes, "eval process")
    training.wait_for(lambda: training.saved(1), "save 1")
    stop(worker)
    training.wait_for(lambda: training.saved(3), "save 3")  # 1 or 2 in the stopped process, 3 or 4 waits for room
    time.sleep(3.0)
    resume(worker)
    training.finish()

    rows = ledger_rows(tmp_path)
    assert statuses(tmp_path / "eval" / "ledger.sqlite") == [
        (i, b, "ok") for i in range(1, 7) for b in ("boolq", "facts")
    ]
    assert max(r["blocked_s"] for r in rows) > 1.5  # a save waited for the stopped process
    (path,) = run_files(tmp_path / "wandb")
    blocked = dict(series(read_run(path), "eval/blocked_s", x="eval/iteration"))
    assert sorted(blocked) == list(range(1, 7)) and max(blocked.values()) > 1.5


def test_a_killed_eval_process_fails_its_evaluation_and_is_restarted(demo_data, tmp_path):
    training = LiveTraining(tmp_path, demo_data, iterations=8, save_interval=2, hook=[*ASYNC, "pending_policy=all"])
    (worker,) = training.wait_for(training.eval_processes, "eval process")
    training.wait_for(lambda: training.saved(2), "save 2")
    stop(worker)  # 2 or 4 is in flight in it once save 6 is made (6 then waits for room)
    training.wait_for(lambda: training.saved(6), "save 6")
    os.kill(worker, signal.SIGKILL)
    output = training.finish()

    rows = ledger_rows(tmp_path)
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all("killed by signal 9" in r["error"] for r in failed)
    assert len({r["iteration"] for r in failed}) == 1
    assert {r["status"] for r in rows if r["iteration"] == 8} == {"ok"}  # evaluated by the restarted process
    pids = training.eval_processes()
    assert len(pids) == 2 and pids[0] == worker
    assert "iteration        8/       8" in output


def test_a_hanging_evaluation_times_out_and_the_process_is_recycled(demo_data, tmp_path):
    hook = [*ASYNC, "pending_policy=all", "eval_timeout_s=20"]
    training = LiveTraining(tmp_path, demo_data, iterations=6, save_interval=2, hook=hook)
    (worker,) = training.wait_for(training.eval_processes, "eval process")
    training.wait_for(lambda: training.saved(2), "save 2")
    stop(worker)  # hangs: the kernel will not run it again
    training.finish()

    rows = ledger_rows(tmp_path)
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all("timed out" in r["error"] and "eval_timeout_s=20" in r["error"] for r in failed)
    assert {r["status"] for r in rows if r["iteration"] == 6} == {"ok"}
    assert len(training.eval_processes()) == 2
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE


def test_a_failing_evaluation_is_recorded_and_the_next_gets_a_fresh_process(demo_data, tmp_path):
    (tmp_path / "data").mkdir()
    data_dir = data_with_a_broken_benchmark(demo_data, tmp_path / "data")
    hook = ["placement=async", "pending_policy=all", HOOKED_BENCHMARKS, f"data_dir={data_dir}"]
    training = LiveTraining(tmp_path, demo_data, iterations=4, save_interval=2, hook=hook)
    output = training.finish()

    assert statuses(tmp_path / "eval" / "ledger.sqlite") == [
        (i, b, status) for i in (2, 4) for b, status in (("boolq", "ok"), ("broken", "failed"), ("facts", "ok"))
    ]
    # iteration 2 failed in the first process, so iteration 4 was evaluated by a second one
    assert len(set(training.eval_processes())) == 2
    assert "iteration        4/       4" in output


def eval_process_gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize(
    "interrupt",
    [
        pytest.param(lambda training: os.killpg(training.process.pid, signal.SIGINT), id="ctrl-c"),
        pytest.param(lambda training: training.process.send_signal(signal.SIGTERM), id="sigterm-to-torchrun"),
        pytest.param(
            lambda training: [child.kill() for child in psutil.Process(training.process.pid).children()],
            id="sigkill-to-the-training-rank",
        ),
    ],
)
def test_no_eval_process_outlives_an_interrupted_training_job(interrupt, demo_data, tmp_path):
    training = LiveTraining(tmp_path, demo_data, iterations=100000, save_interval=5, hook=ASYNC)
    (worker,) = training.wait_for(training.eval_processes, "eval process")
    training.wait_for(lambda: training.saved(5), "save 5")
    stop(worker)  # as busy as it gets: it cannot notice its connection closing
    interrupt(training)
    training.process.wait(60)
    deadline = time.monotonic() + 30
    while not eval_process_gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert eval_process_gone(worker), training.output[-3000:]


def test_what_cannot_finish_after_training_is_recorded_with_the_reason(demo_data, tmp_path):
    hook = [*ASYNC, "finish_timeout_s=3"]
    training = LiveTraining(tmp_path, demo_data, iterations=4, save_interval=2, hook=hook)
    (worker,) = training.wait_for(training.eval_processes, "eval process")
    training.wait_for(lambda: training.saved(2), "save 2")
    stop(worker)  # never finishes: 2 (or 4) in it, 4 waiting
    started = time.monotonic()
    training.finish()

    assert time.monotonic() - started < 60
    rows = {r["iteration"]: r for r in ledger_rows(tmp_path) if r["benchmark"] == "facts"}
    assert rows[4]["status"] in ("skipped", "failed")
    assert "not finished within finish_timeout_s=3 s after the end of training" in rows[4]["error"]
    assert eval_process_gone(worker)


def test_on_the_exit_signal_pending_snapshots_are_skipped_and_the_job_stops(demo_data, tmp_path):
    training = LiveTraining(
        tmp_path, demo_data, iterations=100000, save_interval=3, hook=ASYNC, extra=["--exit-signal-handler"]
    )
    (worker,) = training.wait_for(training.eval_processes, "eval process")
    training.wait_for(lambda: training.saved(3), "save 3")
    stop(worker)  # busy: the saves after it wait
    (rank,) = psutil.Process(training.process.pid).children()
    rank.send_signal(signal.SIGTERM)  # as a scheduler preempting the job does
    training.finish(timeout=120)

    rows = ledger_rows(tmp_path)
    last = max(r["iteration"] for r in rows)
    assert last > 3 and {r["status"] for r in rows if r["iteration"] == last} == {"skipped"}
    assert all("exit signal" in r["error"] for r in rows if r["iteration"] == last)
    assert eval_process_gone(worker)
