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
    "changes, flag",
    [
        ({"context_parallel_size": 2}, "--context-parallel-size"),
        ({"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}, "interleaved pipeline"),
        ({"num_experts": 8}, "--num-experts"),
        ({"expert_model_parallel_size": 2}, "--expert-model-parallel-size"),
    ],
)
def test_layouts_the_sync_placement_cannot_evaluate_are_refused_with_the_alternatives(changes, flag):
    with pytest.raises(ConfigError, match=flag) as refused:
        EvalHook(EvalHookConfig(), megatron_args(**changes))
    assert "placement=async" in str(refused.value) and "megatron-eval backfill" in str(refused.value)


def test_export_hf_is_refused_on_a_sharded_model_in_the_sync_placement(tmp_path):
    with pytest.raises(ConfigError, match="export_hf"):
        EvalHook(EvalHookConfig(export_hf=str(tmp_path)), megatron_args(tensor_model_parallel_size=2))


@pytest.mark.parametrize(
    "changes", [{"tensor_model_parallel_size": 2}, {"pipeline_model_parallel_size": 2}], ids=["TP=2", "PP=2"]
)
def test_tensor_and_pipeline_parallel_runs_are_accepted_in_the_sync_placement(tmp_path, demo_data, changes):
    assert hook_on_demo_data(tmp_path, demo_data, **changes).placement.name == "sync"


def test_sequence_parallelism_is_off_during_an_evaluation_and_restored_attribute_by_attribute(megatron_world):
    from conftest import tiny_gpt

    from megatron_eval_hook.placement.sync import sequence_parallel_off

    model = tiny_gpt(16)
    switched = [(m, "sequence_parallel") for m in model.modules() if hasattr(m, "sequence_parallel")]
    switched += [(model.embedding, "reduce_scatter_embeddings"), (model.config, "sequence_parallel")]
    assert len(switched) > 5
    for owner, name in switched:
        setattr(owner, name, True)
    untouched = [m for m in model.modules() if hasattr(m, "sequence_parallel")][0]
    untouched.sequence_parallel = "not a switch"  # only True is switched, and only True comes back
    with sequence_parallel_off([model]):
        assert all(getattr(owner, name) is False for owner, name in switched if owner is not untouched)
        assert untouched.sequence_parallel == "not a switch"
    assert all(getattr(owner, name) is True for owner, name in switched if owner is not untouched)
    assert untouched.sequence_parallel == "not a switch"


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


@pytest.mark.parametrize("configured", [None, 2048], ids=["--seq-length", "engine.max_sequence_length"])
def test_a_context_window_beyond_the_models_learned_positions_is_refused(tmp_path, configured):
    config = EvalHookConfig(output_dir=str(tmp_path))
    config.engine.max_sequence_length = configured
    args = megatron_args(seq_length=2048, max_position_embeddings=1024, position_embedding_type="learned_absolute")
    with pytest.raises(ConfigError, match="longer than the model's learned position embeddings") as refused:
        EvalHook(config, args)
    assert "--max-position-embeddings 1024" in str(refused.value) and "engine.max_sequence_length" in str(refused.value)


def test_a_rotary_model_may_evaluate_beyond_its_training_length(tmp_path, demo_data):
    rotary = dict(seq_length=2048, max_position_embeddings=1024, position_embedding_type="rope")
    assert hook_on_demo_data(tmp_path, demo_data, **rotary).placement is not None  # no table of positions to outrun


def hook_on_demo_data(tmp_path, demo_data, **changes) -> EvalHook:
    config = EvalHookConfig(benchmarks=["boolq"], data_dir=str(demo_data.helm_dir), output_dir=str(tmp_path))
    config.wandb.enabled = False
    return EvalHook(config, megatron_args(save=str(tmp_path / "run"), **changes))


def test_a_benchmark_that_would_download_is_refused_before_iteration_1_and_the_ledger_is_untouched(tmp_path):
    from megatron_eval_hook.ledger import Ledger

    (tmp_path / "data" / "imdb").mkdir(parents=True)  # a scenario's folder, its files absent
    ledger = tmp_path / "ledger.sqlite"
    config = EvalHookConfig(benchmarks=["imdb"], data_dir=str(tmp_path / "data"), ledger=str(ledger))
    config.wandb.enabled = False
    with pytest.raises(ConfigError) as error:
        EvalHook(config, megatron_args(save=str(tmp_path / "run")))
    message = str(error.value)
    assert message.startswith("--eval-hook-config conf/helm.yaml: benchmark 'imdb'")
    assert "tried to download" in message and "Fix:" in message
    assert not ledger.exists() or Ledger(ledger).results(running=True) == []


@pytest.mark.parametrize(
    "changes, non_persistent",
    [({}, True), ({"ckpt_convert_format": "torch_dist"}, False)],
    ids=["non-persistent save", "format conversion"],
)
def test_saves_that_are_not_training_checkpoints_are_not_evaluated(tmp_path, demo_data, changes, non_persistent):
    from megatron_eval_hook.ledger import Ledger

    hook = hook_on_demo_data(tmp_path, demo_data, **changes)
    hook.after_save(200, model=None, non_persistent=non_persistent)  # would fail on model=None if evaluated
    assert Ledger(tmp_path / "ledger.sqlite").results() == []


def test_a_save_made_because_of_the_exit_signal_is_skipped_with_the_reason(tmp_path, demo_data, monkeypatch):
    from megatron.training import global_vars

    from megatron_eval_hook.ledger import Ledger

    hook = hook_on_demo_data(tmp_path, demo_data, exit_signal_handler=True)
    monkeypatch.setattr(global_vars, "_GLOBAL_SIGNAL_HANDLER", SimpleNamespace(_signal_received=True), raising=False)
    hook.after_save(300, model=None)
    (row,) = Ledger(tmp_path / "ledger.sqlite").results()
    assert (row["iteration"], row["benchmark"], row["status"]) == (300, "boolq", "skipped")
    assert "exit signal" in row["error"]


def test_training_state_comes_back_after_an_evaluation_that_used_every_rng(gpt):
    import random

    import numpy as np
    import torch

    from megatron_eval_hook.placement.sync import preserved_training_state

    def seed_everything():
        random.seed(1)
        np.random.seed(1)
        torch.manual_seed(1)

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    gpt.train()
    seed_everything()
    with preserved_training_state([gpt]):
        gpt.eval()
        draws()  # HELM seeds and draws from Python's and NumPy's generators while it runs
    after_evaluation = draws()
    seed_everything()
    assert after_evaluation == draws()
    assert gpt.training


def gpt2_args(tmp_path, **changes) -> SimpleNamespace:
    """A GPT-2 run's arguments, as far as `export_hf` reads them."""
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("")
    model = dict(
        position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False, squared_relu=False,
        group_query_attention=False, num_query_groups=None, num_attention_heads=4, add_bias_linear=True,
        num_layers=2, layernorm_epsilon=1e-5, bias_gelu_fusion=False, untie_embeddings_and_output_weights=False,
        tokenizer_type="GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"),
        merge_file=str(tmp_path / "merges.txt"),
    )  # fmt: skip
    return megatron_args(**{**model, "save": str(tmp_path / "run"), **changes})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"swiglu": True}, "neither a GPT-2 nor a Llama model; as GPT-2: the MLP is not a plain GELU MLP"),
        ({"position_embedding_type": "rope"}, "as Llama: normalization is LayerNorm, not RMSNorm"),
        ({"tokenizer_type": "SentencePieceTokenizer"}, "--tokenizer-type is SentencePieceTokenizer, not one of"),
        ({"merge_file": None}, "--merge-file None is not a file"),
        ({"save": "SAVE"}, "it is the run's --save folder"),
    ],
)
def test_export_hf_that_cannot_be_written_is_refused_before_training(tmp_path, demo_data, changes, message):
    if changes.get("save") == "SAVE":
        changes["save"] = str(tmp_path / "hf")
    config = EvalHookConfig(
        benchmarks=["boolq"], data_dir=str(demo_data.helm_dir), output_dir=str(tmp_path), export_hf=str(tmp_path / "hf")
    )
    config.wandb.enabled = False
    with pytest.raises(ConfigError, match="export_hf=") as refused:
        EvalHook(config, gpt2_args(tmp_path, **changes))
    assert message in str(refused.value) and "Fix:" in str(refused.value)
    EvalHook(config, gpt2_args(tmp_path))  # the same config on a GPT-2 run is accepted, and on a Llama-style one
    llama = dict(
        position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
        group_query_attention=True, num_query_groups=2, kv_channels=8, hidden_size=32, rotary_base=10000,
        rotary_percent=1.0, use_rope_scaling=False, rotary_seq_len_interpolation_factor=None,
    )  # fmt: skip
    EvalHook(config, gpt2_args(tmp_path, **llama))
    EvalHook(config, gpt2_args(tmp_path, **llama, tokenizer_type="HuggingFaceTokenizer", tokenizer_model="hf"))


def test_a_run_name_another_runs_results_hold_in_the_ledger_is_refused(tmp_path, demo_data):
    config = EvalHookConfig(benchmarks=["boolq"], data_dir=str(demo_data.helm_dir), ledger=str(tmp_path / "l.sqlite"))
    config.wandb.enabled = False
    EvalHook(config, megatron_args(save=str(tmp_path / "first"), wandb_exp_name="llama-1b"))
    EvalHook(config, megatron_args(save=str(tmp_path / "first"), wandb_exp_name="llama-1b"))  # a resume: its own
    with pytest.raises(ConfigError) as refused:
        EvalHook(config, megatron_args(save=str(tmp_path / "second"), wandb_exp_name="llama-1b"))
    message = str(refused.value)
    assert "the run name 'llama-1b' (from --wandb-exp-name) already names another run" in message
    assert str(tmp_path / "first") in message and "run_name=NAME" in message
    config.run_name = "llama-1b-lr2"
    EvalHook(config, megatron_args(save=str(tmp_path / "second"), wandb_exp_name="llama-1b"))


def test_a_run_folder_copied_whole_keeps_its_name(tmp_path, demo_data):
    import shutil

    config = EvalHookConfig(benchmarks=["boolq"], data_dir=str(demo_data.helm_dir))  # ledger in <save>/eval_hook
    config.wandb.enabled = False
    EvalHook(config, megatron_args(save=str(tmp_path / "a" / "run"), wandb_exp_name="x"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # e.g. onto another file system, then resumed from there
    EvalHook(config, megatron_args(save=str(tmp_path / "b" / "run"), wandb_exp_name="x"))
