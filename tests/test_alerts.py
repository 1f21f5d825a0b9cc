"""Regression alerts: a drop beyond noise against an earlier save is recorded, said and logged; evaluating the
same weights again never raises one."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from conftest import TRAINED_WINDOW
from training_runs import FACTS
from wandb_offline import read_run, run_files, series


def damage(model) -> None:
    """Noise as large as each weight tensor's spread, added in place (seeded)."""
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weights in model.parameters():
            weights.add_(torch.randn(weights.shape, generator=noise) * weights.std())


def test_the_same_weights_never_alert_and_a_damaged_model_does(trained_gpt2, demo_data, tmp_path, caplog):
    """Saves 1-3 hold the same trained weights (no change: no alert however often compared); save 4 holds them
    with noise as large as each weight tensor's spread added (the model forgets the facts): an alert, in the
    ledger, the evaluation's log line and the W&B run."""
    import wandb
    from demo_data import load_megatron_tokenizer

    from megatron_eval_hook.config import EvalHookConfig
    from megatron_eval_hook.evaluator import Evaluator
    from megatron_eval_hook.helm.benchmarks import resolve_benchmarks
    from megatron_eval_hook.ledger import Ledger
    from megatron_eval_hook.sinks.wandb import WandbSink

    config = EvalHookConfig(benchmarks=[FACTS, "boolq"], data_dir=str(demo_data.helm_dir), output_dir=str(tmp_path))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    sink = WandbSink(config.wandb, run_name="run", default_dir=tmp_path, default_project="p", use_active_run=False)
    evaluator = Evaluator(config, resolve_benchmarks(config.benchmarks), run="run", output_dir=tmp_path,
                          ledger=ledger, max_sequence_length=TRAINED_WINDOW, placement="sync", sinks=[sink],
                          where="test", megatron_args=SimpleNamespace())  # fmt: skip
    tokenizer = load_megatron_tokenizer(demo_data.vocab_file, demo_data.merge_file, demo_data.root)
    caplog.set_level(logging.INFO, logger="megatron_eval_hook")
    trained = {name: tensor.clone() for name, tensor in trained_gpt2.named_parameters()}
    try:
        for iteration in (1, 2, 3, 4):
            if iteration == 4:
                damage(trained_gpt2)
            evaluator.evaluate(iteration, None, lambda: (trained_gpt2, tokenizer))
            evaluator.publish(iteration)
    finally:
        with torch.no_grad():  # the session's model, as it was
            for name, weights in trained_gpt2.named_parameters():
                weights.copy_(trained[name])
    evaluator.close()
    wandb.teardown()

    alerts = ledger.alerts("run")
    assert {alert["iteration"] for alert in alerts} == {4} and "facts" in {alert["benchmark"] for alert in alerts}
    facts = next(alert for alert in alerts if alert["benchmark"] == "facts")
    assert facts["against"] == 3  # the best earlier save (a tie: the latest of them)
    assert facts["ci_high"] < 0 and facts["p_holm"] < config.alerts.alpha
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iteration ")]
    assert len(lines) == 4 and not any("REGRESSION" in line for line in lines[:3])
    assert "; REGRESSION facts -" in lines[3] and "against iteration 3" in lines[3]
    (path,) = run_files(tmp_path)
    assert [i for i, _ in series(read_run(path), "eval/facts/regression", x="eval/iteration")] == [4]
