"""Megatron GPT-2 → Hugging Face `GPT2LMHeadModel`, in memory.

For models of the GPT-2 architecture that `examples/pretrain_gpt2` trains: learned absolute
positions, LayerNorm, GELU MLP, biases, full multi-head attention, one tensor- and pipeline-
parallel rank. Works with Megatron's local and Transformer Engine layer specs (the latter fuse
the layer norms into the following linear layer). The exported model computes the same
log-probabilities, which lets HELM's own Hugging Face client check this project's engine.
"""

from __future__ import annotations

from typing import Any

import torch


class NotGPT2(ValueError):
    """The Megatron model is not of the GPT-2 architecture; the message says which part differs."""


def _check_gpt2(gpt: Any) -> None:
    config = gpt.config
    problems = []
    if getattr(gpt, "position_embedding_type", "learned_absolute") != "learned_absolute":
        problems.append(f"position embeddings are {gpt.position_embedding_type!r}, not learned_absolute")
    if config.normalization != "LayerNorm":
        problems.append(f"normalization is {config.normalization}, not LayerNorm")
    if config.gated_linear_unit or config.activation_func is not torch.nn.functional.gelu:
        problems.append("the MLP is not a plain GELU MLP")
    if config.num_query_groups not in (None, config.num_attention_heads):
        problems.append("attention uses grouped queries")
    if not config.add_bias_linear:
        problems.append("linear layers have no biases")
    if problems:
        raise NotGPT2("not a GPT-2 model: " + "; ".join(problems))


def _qkv_to_hf(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Megatron's fused QKV rows are ordered (head, q|k|v, channel); GPT-2's are (q|k|v, head, channel)."""
    rest = tensor.shape[1:]
    grouped = tensor.reshape(heads, 3, tensor.shape[0] // (3 * heads), *rest)
    return grouped.transpose(0, 1).reshape(tensor.shape)


def to_hf_gpt2(gpt: Any, *, vocab_size: int, end_of_text: int | None = None) -> Any:
    """A `transformers.GPT2LMHeadModel` (fp32, eval mode) holding the weights of Megatron `gpt`.

    `vocab_size` is the tokenizer's vocabulary: the padded rows of Megatron's embedding are
    dropped, so neither model can predict them.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    _check_gpt2(gpt)
    config = gpt.config
    weights = {k: v.detach().float().cpu() for k, v in gpt.state_dict().items() if "_extra_state" not in k}

    def first(*names: str) -> torch.Tensor:
        for name in names:
            if name in weights:
                return weights[name]
        raise NotGPT2(f"the model has none of the parameters {names}")

    heads, width = config.num_attention_heads, config.hidden_size
    # Megatron's fused bias-GELU kernel is the tanh approximation, its plain path the exact erf.
    activation = "gelu_new" if config.bias_activation_fusion else "gelu"
    hf_config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=weights["embedding.position_embeddings.weight"].shape[0],
        n_embd=width,
        n_layer=config.num_layers,
        n_head=heads,
        n_inner=config.ffn_hidden_size,
        activation_function=activation,
        layer_norm_epsilon=config.layernorm_epsilon,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=gpt.share_embeddings_and_output_weights,
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
    )
    state = {
        "transformer.wte.weight": weights["embedding.word_embeddings.weight"][:vocab_size],
        "transformer.wpe.weight": weights["embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": weights["decoder.final_layernorm.weight"],
        "transformer.ln_f.bias": weights["decoder.final_layernorm.bias"],
    }
    if not gpt.share_embeddings_and_output_weights:
        state["lm_head.weight"] = weights["output_layer.weight"][:vocab_size]
    for i in range(config.num_layers):
        m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
        norm1 = (m + "input_layernorm.", m + "self_attention.linear_qkv.layer_norm_")
        norm2 = (m + "pre_mlp_layernorm.", m + "mlp.linear_fc1.layer_norm_")
        state |= {
            h + "ln_1.weight": first(norm1[0] + "weight", norm1[1] + "weight"),
            h + "ln_1.bias": first(norm1[0] + "bias", norm1[1] + "bias"),
            # GPT-2's Conv1D keeps weights as [in, out], Megatron's linear layers as [out, in].
            h + "attn.c_attn.weight": _qkv_to_hf(weights[m + "self_attention.linear_qkv.weight"], heads).t(),
            h + "attn.c_attn.bias": _qkv_to_hf(weights[m + "self_attention.linear_qkv.bias"], heads),
            h + "attn.c_proj.weight": weights[m + "self_attention.linear_proj.weight"].t(),
            h + "attn.c_proj.bias": weights[m + "self_attention.linear_proj.bias"],
            h + "ln_2.weight": first(norm2[0] + "weight", norm2[1] + "weight"),
            h + "ln_2.bias": first(norm2[0] + "bias", norm2[1] + "bias"),
            h + "mlp.c_fc.weight": weights[m + "mlp.linear_fc1.weight"].t(),
            h + "mlp.c_fc.bias": weights[m + "mlp.linear_fc1.bias"],
            h + "mlp.c_proj.weight": weights[m + "mlp.linear_fc2.weight"].t(),
            h + "mlp.c_proj.bias": weights[m + "mlp.linear_fc2.bias"],
        }
    model = GPT2LMHeadModel(hf_config)
    missing, unexpected = model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf_config.tie_word_embeddings)]
    if missing or unexpected:
        raise NotGPT2(f"weights do not map onto GPT-2: missing {missing}, unexpected {unexpected}")
    return model.eval()
