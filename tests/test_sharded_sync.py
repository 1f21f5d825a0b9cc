"""The sync placement in Megatron's real training loop on a model sharded by tensor and pipeline parallelism
(and data parallelism beside them): every rank computes, and the scores are those of the same checkpoint
evaluated whole, in one process, by `megatron-eval backfill` (which the async placement's equal,
tests/test_async_placement.py), down to each instance's correctness."""

from __future__ import annotations

import pytest
from training_runs import (
    BENCHMARKS,
    LLAMA,
    backfill,
    ok,
    per_instance_correctness,
    scores,
    statuses,
    train,
    training_loss,
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, nproc",
    [
        pytest.param(["--tensor-model-parallel-size", "2"], 2, id="TP=2"),
        pytest.param(["--pipeline-model-parallel-size", "2"], 2, id="PP=2"),
        pytest.param(["--tensor-model-parallel-size", "2"], 4, id="TP=2xDP=2"),
        pytest.param(["--tensor-model-parallel-size", "2", *LLAMA], 2, id="Llama-style TP=2"),
    ],
)
def test_sync_scores_on_the_shards_equal_a_whole_model_backfill_and_training_is_unchanged(
    layout, nproc, demo_data, tmp_path, monkeypatch
):
    hooked = tmp_path / "hooked"
    run = dict(iterations=4, save_interval=2, nproc=nproc, extra=layout)
    result = ok(train(hooked, demo_data, hook=[BENCHMARKS], **run))
    ledger = hooked / "eval" / "ledger.sqlite"
    assert statuses(ledger) == [(i, b, "ok") for i in (2, 4) for b in ("boolq", "facts")]
    assert result.stdout.count("[eval-hook] iteration 2:") == 1  # one HELM rank logs

    monkeypatch.chdir(demo_data.root)
    assert backfill(hooked / "checkpoints", tmp_path / "backfill", demo_data) == 0
    whole = scores(tmp_path / "backfill" / "ledger.sqlite")
    sharded = scores(ledger)
    assert sharded.keys() == whole.keys() and len(whole) > 10
    # log-probability sums (and perplexities, in the thousands here): float rounding of the reductions
    assert sharded == pytest.approx(whole, rel=1e-6, abs=1e-4)
    correct = per_instance_correctness(hooked / "eval")
    assert correct == per_instance_correctness(tmp_path / "backfill") and len(correct) >= 8

    plain = tmp_path / "plain"
    ok(train(plain, demo_data, **run))
    assert training_loss(hooked) == training_loss(plain)
