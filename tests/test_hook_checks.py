"""What the hook refuses before training starts, from Megatron's parsed arguments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_eval_hook.config import ConfigError, EvalHookConfig, ScheduleConfig
from megatron_eval_hook.hook import EvalHook


def megatron_args(**changes) -> SimpleNamespace:
    args = dict(
        eval_hook_config="conf/helm.yaml", save="/tmp/run", save_interval=100, train_iters=1000, seq_length=128,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
        rank=0, world_size=1, wandb_exp_name=None,
    )  # fmt: skip
    return SimpleNamespace(**{**args, **changes})


@pytest.mark.parametrize(
    "flag, attribute",
    [
        ("--tensor-model-parallel-size 2", "tensor_model_parallel_size"),
        ("--pipeline-model-parallel-size 2", "pipeline_model_parallel_size"),
        ("--context-parallel-size 2", "context_parallel_size"),
    ],
)
def test_model_parallel_runs_are_refused_in_the_sync_placement(flag, attribute):
    with pytest.raises(ConfigError, match=flag):
        EvalHook(EvalHookConfig(), megatron_args(**{attribute: 2}))


def test_a_run_that_never_saves_is_refused():
    with pytest.raises(ConfigError, match="--save"):
        EvalHook(EvalHookConfig(), megatron_args(save=None))


def test_a_schedule_that_selects_no_save_is_refused():
    config = EvalHookConfig(schedule=ScheduleConfig(every=150, final=False))  # saves at 100 and 200 only
    with pytest.raises(ConfigError, match="multiple of --save-interval"):
        EvalHook(config, megatron_args(train_iters=250))


def test_a_schedule_starting_after_the_last_iteration_is_refused():
    config = EvalHookConfig(schedule=ScheduleConfig(start=5000))
    with pytest.raises(ConfigError, match="schedule.start=5000"):
        EvalHook(config, megatron_args())
