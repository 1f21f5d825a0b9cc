"""Pretrain a GPT-2 model with Megatron-LM's own training loop and the HELM eval hook.

A self-contained take on Megatron-LM's pretrain_gpt.py (core_r0.19.0) with our own model
provider, forward step and dataset provider. The only addition to a stock run is
``install(args)``: with ``--eval-hook-config`` it evaluates every saved checkpoint with HELM.

GPT-2 architecture: learned absolute positions, LayerNorm, GELU, tied input/output
embeddings (Megatron's defaults); or Llama-style with ``--position-embedding-type rope
--normalization RMSNorm --swiglu`` (and, as usual with it, ``--group-query-attention
--num-query-groups N --disable-bias-linear --untie-embeddings-and-output-weights``). Supports tensor,
pipeline and data parallelism.

Launch with torchrun, e.g. ``torchrun --nproc-per-node 8 pretrain_gpt2.py <megatron args>``, with
``megatron_eval_hook`` importable (``pip install -e .`` or PYTHONPATH). Without a GPU,
``megatron_eval_hook.cpu_shims`` makes it run on CPU (demo and tests only).
"""

from functools import partial

import torch

if not torch.cuda.is_available():
    # At module top level so the spawned checkpoint-writer process gets the shims too.
    from megatron_eval_hook import cpu_shims

    cpu_shims.apply()

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.training import get_args, get_timers, get_tokenizer, pretrain, print_rank_0
from megatron.training.argument_utils import (
    core_transformer_config_from_args,
    pretrain_cfg_container_from_args,
)
from megatron.training.arguments import parse_and_validate_args
from megatron.training.utils import get_blend_and_blend_per_split

from megatron_eval_hook import add_eval_hook_args, install


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Build one (pipeline stage of a) GPT-2 or Llama-style model; Megatron wraps it in DDP afterwards."""
    args = get_args()
    llama = args.position_embedding_type == "rope"
    if llama:
        assert args.normalization == "RMSNorm" and args.swiglu, "Llama-style: rope with RMSNorm and --swiglu"
    else:
        assert args.position_embedding_type == "learned_absolute", "GPT-2 uses learned absolute positions"
        assert args.normalization == "LayerNorm", "GPT-2 uses LayerNorm"
        assert not (args.swiglu or args.squared_relu), "GPT-2 uses a GELU MLP"
    assert args.num_experts is None, "a dense model"
    print_rank_0(f"building {'Llama-style' if llama else 'GPT-2'} model ...")

    if config is None:
        config = core_transformer_config_from_args(args)
    if args.transformer_impl == "local":
        layer_spec = get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=args.qk_layernorm)
    else:
        layer_spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_layernorm)

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )


def get_batch(data_iterator, device):
    """Next micro-batch, on `device`.

    Every rank reads its own copy (see `is_distributed` below), so tensor-parallel peers
    see the same samples without a broadcast.
    """
    batch = next(data_iterator)
    attention_mask = batch.get("attention_mask")  # absent with --no-create-attention-mask-in-dataloader
    if attention_mask is not None:
        attention_mask = attention_mask.to(device, non_blocking=True)
    return (
        batch["tokens"].to(device, non_blocking=True),
        batch["labels"].to(device, non_blocking=True),
        batch["loss_mask"].to(device, non_blocking=True),
        attention_mask,
        batch["position_ids"].to(device, non_blocking=True),
    )


def loss_func(loss_mask, output_tensor):
    """Sum of masked per-token losses, token count, and what to log.

    Returning three values tells Megatron to divide by the token count of the whole global
    batch; the logged [loss_sum, num_tokens] pair is summed over micro-batches and
    data-parallel ranks before 'lm loss' = loss_sum / num_tokens is reported.
    """
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(output_tensor.view(-1).float() * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """One micro-batch forward. Returns the model output and the function that reduces it."""
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    device = next(model.parameters()).device
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, device)
    timers("batch-generator").stop()

    # With labels, GPTModel returns the per-token cross-entropy [batch, seq].
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


def gpt_dataset_config_from_args(args):
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Build the train, validation and test datasets (mock data with --mock-data)."""
    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building train, validation, and test datasets ({dataset_type.__name__}) ...")
    train_ds, valid_ds, test_ds = BlendedMegatronDatasetBuilder(
        dataset_type,
        train_val_test_num_samples,
        lambda: True,  # built on every rank
        gpt_dataset_config_from_args(args),
    ).build()
    print_rank_0("> finished creating GPT datasets ...")
    return train_ds, valid_ds, test_ds


# Ask Megatron to build the data loaders on every rank, not only on tensor-parallel rank 0.
train_valid_test_datasets_provider.is_distributed = True


if __name__ == "__main__":
    args = parse_and_validate_args(
        extra_args_provider=add_eval_hook_args(),
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )
    assert args.context_parallel_size == 1, "this example does not split sequences (context parallel)"
    install(args)
    pretrain(
        pretrain_cfg_container_from_args(args),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )
