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
