"""The W&B sink's run of its own (when Megatron has none), offline."""

from __future__ import annotations

from wandb_offline import read_run, run_files, series

from megatron_eval_hook.config import WandbConfig
from megatron_eval_hook.sinks.wandb import WandbSink, run_id_file


def test_a_restarted_job_logs_into_the_run_it_logged_to_before(tmp_path):
    import wandb

    for iteration in (2, 4):  # two jobs of the same run, the second restarted from the first's checkpoint
        sink = WandbSink(
            WandbConfig(), run_name="run", default_dir=tmp_path, default_project="p", run_id_file=run_id_file(tmp_path)
        )
        sink.log(iteration, {"eval/boolq/quasi_exact_match": iteration / 10})
        sink.close()
    wandb.teardown()  # flushes the offline files

    first, second = (read_run(path) for path in run_files(tmp_path))
    assert first["id"] == second["id"] == (tmp_path / "wandb_run_id").read_text().strip()
    assert [series(job, "eval/boolq/quasi_exact_match", x="eval/iteration") for job in (first, second)] == [
        [(2, 0.2)],
        [(4, 0.4)],
    ]


def test_a_sink_that_must_not_attach_to_the_active_run_opens_its_own(tmp_path):
    import wandb

    active = wandb.init(project="p", dir=str(tmp_path / "active"), reinit="create_new")
    try:
        sink = WandbSink(WandbConfig(), run_name="run", default_dir=tmp_path / "own", default_project="p",
                         use_active_run=False)  # fmt: skip
        sink.log(3, {"eval/x": 1.0})
        sink.close()
    finally:
        active.finish()
    wandb.teardown()
    (own,) = run_files(tmp_path / "own")
    assert series(read_run(own), "eval/x", x="eval/iteration") == [(3, 1.0)]


def ok_evaluation(ledger, run: str, iteration: int, value: float) -> None:
    from megatron_eval_hook.ledger import MetricValue

    attempt = ledger.begin(run, iteration, "boolq", placement="sync", main_metric="qem", main_split="valid")
    ledger.finish_ok(attempt, [MetricValue("qem", "valid", value, 4), MetricValue("em", "valid", value / 2, 4)], 1.0)


class Unreachable:
    """A sink that fails `failures` times, then logs into `into`."""

    name = "wandb"

    def __init__(self, into, failures: int):
        self.into, self.failures = into, failures

    def log(self, iteration, values):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("W&B unreachable")
        self.into.log(iteration, values)


def test_scores_a_sink_never_received_are_logged_again_exactly_once(tmp_path):
    """A job killed after recording scores in the ledger but before logging them (iteration 20), and a sink down
    for a while (iteration 30): the next process logs each into the same W&B run, at its own iteration, once."""
    import wandb

    from megatron_eval_hook.ledger import Ledger
    from megatron_eval_hook.sinks import Deliveries

    ledger = Ledger(tmp_path / "ledger.sqlite")
    for iteration in (10, 20):
        ok_evaluation(ledger, "run", iteration, iteration / 100)
    ledger.mark_delivered("run", 10, ["boolq"], "wandb")  # the killed job logged 10, not 20

    def sink() -> WandbSink:
        return WandbSink(WandbConfig(), run_name="run", default_dir=tmp_path, default_project="p",
                         run_id_file=run_id_file(tmp_path))  # fmt: skip

    resumed = sink()
    down = Unreachable(resumed, failures=2)
    deliveries = Deliveries([down], ledger, "run", log_all_metrics=False)
    assert deliveries.pending == 1  # 20
    deliveries.deliver(1)  # W&B down: 20 waits
    ok_evaluation(ledger, "run", 30, 0.3)
    deliveries.send(30, {"eval/boolq/qem": 0.3, "eval/duration_s": 1.0})  # down again: 30 waits too
    assert deliveries.pending == 2
    deliveries.deliver(1)  # one row per training step while training runs
    assert deliveries.pending == 1
    deliveries.flush()
    assert deliveries.pending == 0
    resumed.close()
    assert Deliveries([sink()], ledger, "run", log_all_metrics=False).pending == 0  # a later job: nothing left
    wandb.teardown()

    runs = [read_run(path) for path in run_files(tmp_path)]
    logged = [point for run in runs for point in series(run, "eval/boolq/qem", x="eval/iteration")]
    assert sorted(logged) == [(20, 0.2), (30, 0.3)]  # 10 was logged by the killed job; none twice
    assert all("eval/boolq/em" not in row for run in runs for row in run["history"])  # the main metric only


def test_a_ledger_from_before_deliveries_counts_its_scores_as_received(tmp_path):
    import sqlite3

    from megatron_eval_hook.ledger import Ledger
    from megatron_eval_hook.sinks import Deliveries

    path = tmp_path / "ledger.sqlite"
    ok_evaluation(Ledger(path), "run", 10, 0.1)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE deliveries")  # as the ledger was
    assert Deliveries([Unreachable(None, failures=0)], Ledger(path), "run", log_all_metrics=False).pending == 0


def test_scores_count_as_received_by_wandb_once_it_closed_their_row(tmp_path):
    """The save's scores go into Megatron's row of that iteration, which W&B holds open until a later step is
    logged (a job killed meanwhile loses it): the ledger counts them as received only then, or at the end."""
    import wandb

    from megatron_eval_hook.ledger import Ledger
    from megatron_eval_hook.sinks import Deliveries

    ledger = Ledger(tmp_path / "ledger.sqlite")
    run = wandb.init(project="p", dir=str(tmp_path))  # Megatron's run, the active one
    try:
        sink = WandbSink(WandbConfig(), run_name="run", default_dir=tmp_path, default_project="p")
        deliveries = Deliveries([sink], ledger, "run", log_all_metrics=False)
        for iteration in (5, 6):
            run.log({"lm loss": 1.0 / iteration}, step=iteration)
            ok_evaluation(ledger, "run", iteration, iteration / 10)
            deliveries.send(iteration, {"eval/boolq/qem": iteration / 10})
            deliveries.deliver(1)  # after the training log step of the same iteration: the row is still open
            unwritten = {r["iteration"] for r in ledger.undelivered("run", "wandb", ledger.last_evaluation_id())}
            assert unwritten == {iteration}  # the one before was closed by this step's row
        deliveries.flush()  # the end of training: no later step will come
        assert ledger.undelivered("run", "wandb", ledger.last_evaluation_id()) == []
    finally:
        run.finish()
    wandb.teardown()
    (path,) = run_files(tmp_path)
    assert series(read_run(path), "eval/boolq/qem", x="eval/iteration") == [(5, 0.5), (6, 0.6)]
