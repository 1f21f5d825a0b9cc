"""`megatron-eval backfill` on checkpoints written by Megatron's real training loop (CPU, gloo)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cpu_run import CPU_ARGS, PRETRAIN_GPT2, torchrun_command
from training_runs import FACTS, TINY, backfill, ok, scores, statuses
from wandb_offline import read_run, run_files, series

from megatron_eval_hook.ledger import Ledger

pytestmark = pytest.mark.slow


def backfill_run(folder: Path) -> dict:
    """The W&B run backfill wrote under `folder`, read once wandb-core has flushed it."""
    import wandb

    wandb.teardown()
    (path,) = run_files(folder)
    return read_run(path)


@pytest.fixture
def in_demo_root(demo_data, monkeypatch):
    """Megatron's GPT2BPETokenizer resolves the name 'gpt2' from the working directory (demo_data.py)."""
    monkeypatch.chdir(demo_data.root)


def test_backfilled_scores_equal_the_hooks_for_every_iteration(hooked, demo_data, tmp_path, in_demo_root):
    run, _ = hooked
    assert backfill(run / "checkpoints", tmp_path, demo_data) == 0

    hook_scores = scores(run / "eval" / "ledger.sqlite")
    assert {key[0] for key in hook_scores} == {3, 6, 7}
    assert scores(tmp_path / "ledger.sqlite", placement="backfill") == hook_scores
    assert statuses(tmp_path / "ledger.sqlite") == [(i, b, "ok") for i in (3, 6, 7) for b in ("boolq", "facts")]

    # the same W&B and TensorBoard keys, against the checkpoint's iteration
    logged = backfill_run(tmp_path)
    assert logged["id"] == (tmp_path / "wandb_backfill_run_id").read_text().strip()
    assert [i for i, _ in series(logged, "eval/facts/exact_match", x="eval/iteration")] == [3, 6, 7]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("eval/boolq/quasi_exact_match")] == [3, 6, 7]


def test_backfill_is_idempotent_and_evaluates_only_what_is_missing(hooked, demo_data, tmp_path, in_demo_root, capsys):
    run, _ = hooked
    assert backfill(run / "checkpoints", tmp_path, demo_data, "--start", "6", "--end", "6") == 0
    first = Ledger(tmp_path / "ledger.sqlite").results(all_metrics=True)
    assert {(r["iteration"], r["benchmark"]) for r in first} == {(6, "boolq"), (6, "facts")}

    assert backfill(run / "checkpoints", tmp_path, demo_data, "--start", "6", "--end", "6") == 0
    assert Ledger(tmp_path / "ledger.sqlite").results(all_metrics=True) == first
    assert "nothing to evaluate" in capsys.readouterr().out

    # A benchmark added later is evaluated alone; those already ok are not evaluated again.
    more = f"benchmarks=[boolq,'{FACTS}',narrative_qa]"
    assert backfill(run / "checkpoints", tmp_path, demo_data, "--start", "6", "--end", "6", "--override", more) == 0
    assert statuses(tmp_path / "ledger.sqlite") == [(6, b, "ok") for b in ("boolq", "facts", "narrative_qa")]


def test_every_k_selects_iterations_from_start(hooked, demo_data, tmp_path, in_demo_root):
    run, _ = hooked
    assert backfill(run / "checkpoints", tmp_path, demo_data, "--start", "3", "--every", "3") == 0
    # 3 and 6 on the grid; 7 is the run's last save (schedule.final)
    assert sorted({r["iteration"] for r in Ledger(tmp_path / "ledger.sqlite").results()}) == [3, 6, 7]
    other = tmp_path / "other"
    assert backfill(run / "checkpoints", other, demo_data, "--every", "6", "--override", "schedule.final=false") == 0
    assert sorted({r["iteration"] for r in Ledger(other / "ledger.sqlite").results()}) == [6]


@pytest.fixture(scope="module")
def tensor_parallel_save(hooked, demo_data, tmp_path_factory) -> Path:
    """The hooked run's last checkpoint (iteration 7) saved again by Megatron's pretrain() at tensor parallel 2,
    in two gloo processes: through its checkpoint-conversion path, which loads the checkpoint into the TP=2
    model and saves it, so the weights are exactly those the hook evaluated."""
    run, _ = hooked
    out = tmp_path_factory.mktemp("tp2")
    args = [
        str(PRETRAIN_GPT2), *TINY, *CPU_ARGS, "--tensor-model-parallel-size", "2", "--global-batch-size", "4",
        "--train-iters", "7", "--vocab-file", str(demo_data.vocab_file), "--merge-file", str(demo_data.merge_file),
        "--data-path", str(demo_data.data_prefix), "--load", str(run / "checkpoints"), "--no-load-optim",
        "--no-load-rng", "--ckpt-convert-format", "torch_dist", "--ckpt-convert-save", str(out),
    ]  # fmt: skip
    result = subprocess.run(
        torchrun_command(args, nproc=2), cwd=demo_data.root, capture_output=True, text=True, timeout=600
    )
    ok(result)
    return out / "torch_dist"


def test_a_tensor_parallel_save_is_backfilled_in_one_process_with_the_hooks_scores(
    tensor_parallel_save, hooked, demo_data, tmp_path, in_demo_root
):
    import torch.distributed.checkpoint as dcp

    from megatron_eval_hook.checkpoints import read_args

    folder = tensor_parallel_save / "iter_0000007"
    assert read_args(folder).tensor_model_parallel_size == 2
    stored = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    qkv = stored["decoder.layers.self_attention.linear_qkv.weight"]  # [layers, 3 * hidden, hidden]
    assert {chunk.offsets[1] for chunk in qkv.chunks} == {0, qkv.size[1] // 2}  # split between the two ranks

    assert backfill(tensor_parallel_save, tmp_path, demo_data) == 0
    run, _ = hooked
    expected = scores(run / "eval" / "ledger.sqlite", iterations={7})
    assert expected and scores(tmp_path / "ledger.sqlite") == expected


def copy_iteration(source: Path, target: Path, iteration: int, *, tracker: bool) -> None:
    name = f"iter_{iteration:07d}"
    shutil.copytree(source / name, target / name)
    if tracker:
        (target / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def test_follow_evaluates_complete_saves_as_they_appear_and_ignores_incomplete_ones(
    hooked, demo_data, tmp_path, in_demo_root, monkeypatch
):
    import megatron_eval_hook.backfill as backfill_module

    run, _ = hooked
    saves = tmp_path / "checkpoints"
    saves.mkdir()
    copy_iteration(run / "checkpoints", saves, 3, tracker=True)
    out = tmp_path / "eval"

    def iteration_6_written_but_not_complete():
        copy_iteration(run / "checkpoints", saves, 6, tracker=False)

    def save_of_6_completes():
        assert {r["iteration"] for r in Ledger(out / "ledger.sqlite").results()} == {3}  # 6 was not taken
        (saves / "latest_checkpointed_iteration.txt").write_text("6")

    polls = iter([iteration_6_written_but_not_complete, lambda: None, save_of_6_completes])
    monkeypatch.setattr(backfill_module, "sleep", lambda seconds: next(polls)())
    assert backfill(saves, out, demo_data, "--follow", "--poll-s", "0.1", "--end", "6") == 0

    assert next(polls, "all used") == "all used"
    assert scores(out / "ledger.sqlite") == scores(run / "eval" / "ledger.sqlite", iterations={3, 6})


def test_ctrl_c_while_waiting_exits_cleanly(hooked, demo_data, tmp_path, in_demo_root, monkeypatch, capsys):
    import megatron_eval_hook.backfill as backfill_module

    run, _ = hooked

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(backfill_module, "sleep", interrupt)
    assert backfill(run / "checkpoints", tmp_path, demo_data, "--follow", "--start", "7") == 130
    assert "stopped (Ctrl-C)" in capsys.readouterr().err
    assert statuses(tmp_path / "ledger.sqlite") == [(7, "boolq", "ok"), (7, "facts", "ok")]
    assert backfill_run(tmp_path)["exited"]  # the W&B run was finished


def test_ctrl_c_during_an_evaluation_leaves_nothing_half_recorded(
    hooked, demo_data, tmp_path, in_demo_root, monkeypatch
):
    from megatron_eval_hook.helm.runner import HelmSuite

    run, _ = hooked
    original = HelmSuite._run

    def interrupted_on_facts(self, runner, spec, prepared):
        if prepared.name == "facts":
            raise KeyboardInterrupt
        return original(self, runner, spec, prepared)

    monkeypatch.setattr(HelmSuite, "_run", interrupted_on_facts)
    assert backfill(run / "checkpoints", tmp_path, demo_data, "--start", "7") == 130
    rows = Ledger(tmp_path / "ledger.sqlite").results()
    assert [(r["benchmark"], r["status"]) for r in rows] == [("boolq", "ok"), ("facts", "failed")]
    assert "interrupted" in rows[1]["error"]
    logged = backfill_run(tmp_path)
    assert [i for i, _ in series(logged, "eval/boolq/quasi_exact_match", x="eval/iteration")] == [7]

    monkeypatch.setattr(HelmSuite, "_run", original)
    assert backfill(run / "checkpoints", tmp_path, demo_data, "--start", "7") == 0  # evaluates facts alone
    assert scores(tmp_path / "ledger.sqlite") == scores(run / "eval" / "ledger.sqlite", iterations={7})


# -- bad input: a clear error naming the value, where it came from and the fix


def test_a_missing_folder_is_named_with_the_fix(demo_data, tmp_path, capsys):
    assert backfill(tmp_path / "nowhere", tmp_path / "out", demo_data) == 2
    error = capsys.readouterr().err
    assert f"--checkpoints {tmp_path / 'nowhere'}" in error and "does not exist" in error and "Fix:" in error


def test_a_folder_without_complete_checkpoints_is_refused(hooked, demo_data, tmp_path, capsys):
    assert backfill(tmp_path, tmp_path / "out", demo_data) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    run, _ = hooked
    copy_iteration(run / "checkpoints", tmp_path, 3, tracker=False)
    assert backfill(tmp_path, tmp_path / "out", demo_data) == 2
    error = capsys.readouterr().err
    assert "[3]" in error and "did not finish" in error and "--follow" in error


def test_a_wrong_config_names_the_key_and_the_flag(hooked, demo_data, tmp_path, capsys):
    run, _ = hooked
    assert backfill(run / "checkpoints", tmp_path, demo_data, "--override", "schedule.evry=2") == 2
    error = capsys.readouterr().err
    assert "--config" in error and "schedule.evry" in error and "Fix:" in error
    assert backfill(run / "checkpoints", tmp_path, demo_data, "--start", "5", "--end", "2") == 2
    assert "--end 2 is before --start 5" in capsys.readouterr().err


def test_a_missing_tokenizer_file_is_named_with_the_flag_that_fixes_it(
    hooked, demo_data, tmp_path, in_demo_root, capsys
):
    run, _ = hooked
    assert backfill(run / "checkpoints", tmp_path, demo_data, "--vocab-file", str(tmp_path / "gone.json")) == 2
    error = capsys.readouterr().err
    assert "gone.json" in error and "--vocab-file" in error


def test_an_unreadable_checkpoint_is_recorded_and_the_others_are_evaluated(
    hooked, demo_data, tmp_path, in_demo_root, capsys
):
    run, _ = hooked
    saves = tmp_path / "checkpoints"
    saves.mkdir()
    for iteration in (3, 6):
        copy_iteration(run / "checkpoints", saves, iteration, tracker=True)
    for shard in (saves / "iter_0000003").glob("*.distcp"):
        shard.write_bytes(b"truncated")
    assert backfill(saves, tmp_path / "out", demo_data) == 1
    assert "iter_0000003" in capsys.readouterr().err
    assert statuses(tmp_path / "out" / "ledger.sqlite") == [
        (3, "boolq", "failed"), (3, "facts", "failed"), (6, "boolq", "ok"), (6, "facts", "ok"),
    ]  # fmt: skip
    errors = {r["error"] for r in Ledger(tmp_path / "out" / "ledger.sqlite").results() if r["status"] == "failed"}
    assert all("iter_0000003" in e for e in errors)


def test_a_legacy_format_checkpoint_is_refused_with_the_conversion_fix(demo_data, tmp_path, capsys):
    (tmp_path / "iter_0000002" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    assert backfill(tmp_path, tmp_path / "out", demo_data) == 2
    error = capsys.readouterr().err
    assert "not a torch_dist checkpoint" in error and "--ckpt-convert-format torch_dist" in error
