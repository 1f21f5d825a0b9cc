"""A checkpoint's model outside training: rebuilt in one process, on one device, from its saved arguments.

`CheckpointModel(args)` builds the run's Megatron `GPTModel` without tensor, pipeline or context
parallelism, and the run's tokenizer, from the arguments stored in a checkpoint (what Megatron's
own `--use-checkpoint-args` reads). `load(folder)` then reads a torch_dist checkpoint into it with
megatron.core's dist-checkpointing, which reassembles every tensor from the shards of whatever
TP/PP layout the run was saved with. The model is built once and reloaded for each checkpoint.

Dense GPT models only (the GPT-2 architecture is the tested one): learned or rotary positions,
LayerNorm or RMSNorm, GELU or SwiGLU, grouped queries. Mixture-of-experts, multi-latent attention,
multi-token prediction and hybrid models are refused. The device is the current CUDA device when
there is one, else the CPU (through the CPU shims, as the demo uses).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from megatron_eval_hook.checkpoints import CheckpointError, describe_read_error

# Arguments that change the model's shape or numerics: checkpoints agreeing on them share one built model.
_ARCHITECTURE_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "group_query_attention", "padded_vocab_size", "max_position_embeddings", "position_embedding_type",
    "rotary_percent", "rotary_base", "use_rope_scaling", "rope_scaling_factor", "normalization",
    "layernorm_epsilon", "swiglu", "squared_relu", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
    "untie_embeddings_and_output_weights", "apply_layernorm_1p", "bias_gelu_fusion", "transformer_impl", "bf16",
    "fp16",
)  # fmt: skip


def architecture_of(args: Any) -> tuple:
    return tuple(getattr(args, name, None) for name in _ARCHITECTURE_ARGS)


def ensure_single_process(seed: int) -> None:
    """torch.distributed and Megatron's parallel state for one process without model parallelism
    (created when absent; an existing world of one with TP = PP = 1 is used as it is)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError(
            f"checkpoints are evaluated in one process, but torch.distributed has {dist.get_world_size()}. "
            "Fix: run megatron-eval without torchrun."
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.random.initialize_rng_tracker()


def _refuse_unsupported(args: Any, where: Path) -> None:
    features = {
        "mixture of experts (--num-experts)": getattr(args, "num_experts", None),
        "multi-latent attention": getattr(args, "multi_latent_attention", False),
        "multi-token prediction (--mtp-num-layers)": getattr(args, "mtp_num_layers", None),
        "heterogeneous layers": getattr(args, "heterogeneous_layers_config_path", None),
        "a hybrid layer pattern": getattr(args, "hybrid_layer_pattern", None),
    }
    found = [name for name, value in features.items() if value]
    if found:
        raise CheckpointError(
            f"{where}: the model uses {', '.join(found)}; checkpoints are rebuilt as dense GPT models only. "
            "Fix: evaluate this run with the hook during training."
        )


def single_device_args(args: Any, **paths: str | None) -> argparse.Namespace:
    """A copy of a checkpoint's arguments for one process: no model parallelism, no initialisation
    (the weights are loaded), on the CPU when there is no CUDA device. `paths` replace the
    tokenizer's file arguments (vocab_file, merge_file, tokenizer_model) when given."""
    one = argparse.Namespace(**vars(args))
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        setattr(one, name, 1)
    one.expert_model_parallel_size = one.expert_tensor_parallel_size = 1
    one.virtual_pipeline_model_parallel_size = None
    one.decoder_first_pipeline_num_layers = one.decoder_last_pipeline_num_layers = None
    one.pipeline_model_parallel_layout = None
    one.sequence_parallel = one.tp_comm_overlap = False
    one.use_cpu_initialization = not torch.cuda.is_available()
    one.perform_initialization = False
    for name, value in paths.items():
        if value is not None:
            setattr(one, name, value)
    return one


class CheckpointModel:
    """The run's GPTModel and tokenizer, built once from a checkpoint's arguments, loaded per checkpoint."""

    def __init__(self, args: Any, where: Path, **tokenizer_paths: str | None):
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_local_spec,
            get_gpt_layer_with_transformer_engine_spec,
        )
        from megatron.training.argument_utils import core_transformer_config_from_args

        _refuse_unsupported(args, where)
        self.architecture = architecture_of(args)
        one = single_device_args(args, **tokenizer_paths)
        self.tokenizer = build_run_tokenizer(one, where)
        ensure_single_process(getattr(args, "seed", 1234))
        use_te = one.transformer_impl == "transformer_engine" and torch.cuda.is_available() and _has_te()
        if use_te:
            spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=getattr(one, "qk_layernorm", False))
        else:
            one.transformer_impl, one.fp8 = "local", None
            spec = get_gpt_layer_local_spec(
                qk_layernorm=getattr(one, "qk_layernorm", False), normalization=one.normalization
            )
        model = GPTModel(
            config=core_transformer_config_from_args(one),
            transformer_layer_spec=spec,
            vocab_size=args.padded_vocab_size,
            max_sequence_length=one.max_position_embeddings,
            share_embeddings_and_output_weights=not one.untie_embeddings_and_output_weights,
            position_embedding_type=one.position_embedding_type,
            rotary_percent=one.rotary_percent,
            rotary_base=one.rotary_base,
            rope_scaling=getattr(one, "use_rope_scaling", False),
            rope_scaling_factor=getattr(one, "rope_scaling_factor", 8.0),
            seq_len_interpolation_factor=getattr(one, "rotary_seq_len_interpolation_factor", None),
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if one.bf16:  # as Megatron's Float16Module holds the model in training
            model.bfloat16()
        elif one.fp16:
            model.half()
        self.gpt = model.eval()

    def load(self, folder: Path) -> None:
        """Read the weights of the torch_dist checkpoint in `folder` into the model."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        # Transformer Engine's _extra_state (FP8 scaling metadata) is sharded per TP layout and unused here.
        request = {k: v for k, v in self.gpt.sharded_state_dict().items() if not k.endswith("_extra_state")}
        try:
            loaded = dist_checkpointing.load(request, str(folder))
        except (Exception, CheckpointException) as error:
            raise CheckpointError(
                f"{folder}: the model's weights cannot be read ({describe_read_error(error)}). Fix: check that "
                "the save finished and its files are intact, or leave this iteration out with --start/--end."
            ) from error
        missing, _ = self.gpt.load_state_dict({k: loaded[k] for k in request}, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"{folder}: the checkpoint lacks the model parameters {missing[:5]}")


def _has_te() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def build_run_tokenizer(args: argparse.Namespace, where: Path) -> Any:
    """Megatron's tokenizer for a run with arguments `args` (stored in the checkpoint `where`), as training
    built it; raises `CheckpointError` naming the flag of a missing file."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    for name in ("vocab_file", "merge_file"):
        value = getattr(args, name, None)
        if value and not Path(value).is_file():
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(
                f"the tokenizer file {value} ({flag} stored in {where}) does not exist here. "
                f"Fix: pass {flag} PATH with the file the run was trained with."
            )
    try:
        return build_tokenizer(args)
    except Exception as error:
        raise CheckpointError(
            f"the run's tokenizer ({args.tokenizer_type}, from the arguments stored in {where}) cannot be built: "
            f"{type(error).__name__}: {error}. Fix: make its files reachable as in training (--vocab-file, "
            "--merge-file, --tokenizer-model), and run from the folder training ran from when the tokenizer "
            "is resolved by name."
        ) from error
