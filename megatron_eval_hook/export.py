"""Megatron GPT → Hugging Face `GPT2LMHeadModel` or `LlamaForCausalLM`, from a live model or a checkpoint folder.

Two architectures map exactly:
- GPT-2: learned absolute positions, LayerNorm, GELU MLP, biases, full multi-head attention;
- Llama: rotary positions (every channel, by halves; the default, linear-interpolation or Llama 3 angles),
  RMSNorm, SwiGLU MLP, grouped-query or full attention, with or without biases, tied or untied embeddings.
Anything else is refused with what differs, never exported approximately. Works with Megatron's local
and Transformer Engine layer specs (the latter fuse the norms into the next linear layer), and with
torch_dist checkpoints of any tensor/pipeline-parallel layout (PyTorch's distributed checkpoint reader
assembles the full tensors). The exported model computes the same log-probabilities, which lets HELM's own
Hugging Face client check this project's engine.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class NotExportable(ValueError):
    """The Megatron model maps onto no Hugging Face architecture exactly; the message says what differs."""


@dataclass(frozen=True)
class Architecture:
    """What the weights alone do not tell about a Megatron GPT model, and which Hugging Face model it is."""

    family: str  # "gpt2" or "llama"
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    layernorm_epsilon: float
    tanh_gelu: bool  # Megatron's fused bias-GELU kernel is the tanh approximation, its plain path exact erf
    tied_embeddings: bool
    biases: bool
    rotary_base: float = 10000.0
    # the rotary angle per position and channel pair as Megatron computes it (its interpolation included)
    inv_freq: torch.Tensor | None = None
    interpolation: float | None = None  # Megatron's rotary position interpolation factor

    @classmethod
    def of_model(cls, gpt: Any) -> Architecture:
        config = gpt.config
        positions = getattr(gpt, "position_embedding_type", "learned_absolute")
        rotary = gpt.rotary_pos_emb if positions == "rope" else None
        family = _family(
            positions=positions,
            normalization=config.normalization,
            activation=_activation(config.gated_linear_unit, config.activation_func),
            grouped_queries=config.num_query_groups not in (None, config.num_attention_heads),
            biases=bool(config.add_bias_linear),
            qk_layernorm=bool(config.qk_layernorm),
            rotary_percent=getattr(gpt, "rotary_percent", 1.0),
            rotary_interleaved=bool(config.rotary_interleaved),
        )
        return cls(
            family,
            config.num_layers,
            config.num_attention_heads,
            config.num_query_groups or config.num_attention_heads,
            config.layernorm_epsilon,
            bool(config.bias_activation_fusion),
            bool(gpt.share_embeddings_and_output_weights),
            bool(config.add_bias_linear),
            float(getattr(gpt, "rotary_base", 10000)),
            None if rotary is None else rotary.inv_freq.detach().float().cpu(),
            None if rotary is None else rotary.seq_len_interpolation_factor,
        )

    @classmethod
    def of_args(cls, args: Any) -> Architecture:
        """From the Megatron arguments stored in a checkpoint."""
        import torch.nn.functional as F

        gated = bool(args.swiglu or getattr(args, "squared_relu", False))
        activation = _activation(gated, F.silu if args.swiglu else F.gelu)
        family = _family(
            positions=args.position_embedding_type,
            normalization=args.normalization,
            activation="other" if getattr(args, "squared_relu", False) else activation,
            grouped_queries=bool(args.group_query_attention)
            and args.num_query_groups not in (None, args.num_attention_heads),
            biases=bool(args.add_bias_linear),
            qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
            rotary_percent=getattr(args, "rotary_percent", 1.0),
            rotary_interleaved=bool(getattr(args, "rotary_interleaved", False)),
        )
        inv_freq, interpolation = None, None
        if family == "llama":
            from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

            interpolation = getattr(args, "rotary_seq_len_interpolation_factor", None)
            inv_freq = RotaryEmbedding(
                kv_channels=args.kv_channels or args.hidden_size // args.num_attention_heads,
                rotary_percent=1.0,
                seq_len_interpolation_factor=interpolation,
                rotary_base=args.rotary_base,
                rope_scaling=bool(getattr(args, "use_rope_scaling", False)),
                rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
                use_cpu_initialization=True,
            ).inv_freq
        return cls(
            family,
            args.num_layers,
            args.num_attention_heads,
            args.num_query_groups if args.group_query_attention and args.num_query_groups else args.num_attention_heads,
            args.layernorm_epsilon,
            bool(args.bias_gelu_fusion),
            not args.untie_embeddings_and_output_weights,
            bool(args.add_bias_linear),
            float(getattr(args, "rotary_base", 10000)),
            inv_freq,
            interpolation,
        )


def _activation(gated: bool, function: Any) -> str:
    import torch.nn.functional as F

    if gated:
        return "swiglu" if function is F.silu else "other"
    return "gelu" if function is F.gelu else "other"


def _family(
    *,
    positions: str,
    normalization: str,
    activation: str,
    grouped_queries: bool,
    biases: bool,
    qk_layernorm: bool,
    rotary_percent: float,
    rotary_interleaved: bool,
) -> str:
    """ "gpt2" or "llama"; raises `NotExportable` naming every difference from the closer of the two."""
    gpt2 = [
        f"position embeddings are {positions!r}, not learned_absolute" if positions != "learned_absolute" else "",
        f"normalization is {normalization}, not LayerNorm" if normalization != "LayerNorm" else "",
        "the MLP is not a plain GELU MLP" if activation != "gelu" else "",
        "attention uses grouped queries" if grouped_queries else "",
        "linear layers have no biases" if not biases else "",
        "queries and keys are layer-normalized (--qk-layernorm)" if qk_layernorm else "",
    ]
    llama = [
        f"position embeddings are {positions!r}, not rope" if positions != "rope" else "",
        f"normalization is {normalization}, not RMSNorm" if normalization != "RMSNorm" else "",
        "the MLP is not SwiGLU" if activation != "swiglu" else "",
        "queries and keys are layer-normalized (--qk-layernorm)" if qk_layernorm else "",
        f"rotary embeddings cover {rotary_percent:g} of each head, not all of it"
        if positions == "rope" and rotary_percent != 1.0
        else "",
        "rotary embeddings rotate interleaved channel pairs (--rotary-interleaved), not halves"
        if rotary_interleaved
        else "",
    ]
    gpt2, llama = [p for p in gpt2 if p], [p for p in llama if p]
    if not gpt2:
        return "gpt2"
    if not llama:
        return "llama"
    closer, problems = ("Llama", llama) if positions == "rope" else ("GPT-2", gpt2)
    raise NotExportable(f"neither a GPT-2 nor a Llama model; as {closer}: " + "; ".join(problems))


def _qkv_to_hf(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Megatron's fused QKV rows are ordered (head, q|k|v, channel); GPT-2's are (q|k|v, head, channel)."""
    grouped = tensor.reshape(heads, 3, tensor.shape[0] // (3 * heads), *tensor.shape[1:])
    return grouped.transpose(0, 1).reshape(tensor.shape)


def _qkv_split(tensor: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused QKV rows are ordered per query group: its heads' queries, then its key, then its value;
    Llama's are three matrices (queries by head, keys by group, values by group)."""
    per = heads // groups
    grouped = tensor.reshape(groups, per + 2, tensor.shape[0] // (groups * (per + 2)), *tensor.shape[1:])
    rows = lambda part: part.reshape(-1, *tensor.shape[1:])  # noqa: E731
    return rows(grouped[:, :per]), rows(grouped[:, per]), rows(grouped[:, per + 1])


def to_hf(gpt: Any, *, vocab_size: int, end_of_text: int | None = None) -> Any:
    """A `transformers.GPT2LMHeadModel` or `LlamaForCausalLM` (fp32, eval mode) holding the weights of the live
    Megatron `gpt`.

    `vocab_size` is the tokenizer's vocabulary: the padded rows of Megatron's embedding are
    dropped, so neither model can predict them.
    """
    # copies: the Hugging Face model gets tensors of its own, never the live model's
    weights = {
        k: v.detach().to("cpu", torch.float32, copy=True)
        for k, v in gpt.state_dict().items()
        if "_extra_state" not in k
    }
    return _hf_model(weights, Architecture.of_model(gpt), vocab_size, end_of_text)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """The full model tensors (per-layer names, as in a live model's state_dict) and the Megatron
    arguments of a torch_dist checkpoint: a save folder (its latest iteration) or an `iter_*` folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_eval_hook.checkpoints import checkpoint_folder, read_args

    folder = checkpoint_folder(path)
    args = read_args(folder)
    reader = dcp.FileSystemReader(str(folder))
    stored = reader.read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in stored.items()
        if isinstance(meta, TensorStorageMetadata) and key.split(".")[0] in ("embedding", "decoder", "output_layer")
    }
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    weights = {}
    for key, tensor in tensors.items():
        if key.startswith("decoder.layers."):  # stored stacked over layers: [num_layers, ...]
            for layer, part in enumerate(tensor):
                weights[key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1)] = part.float()
        else:
            weights[key] = tensor.float()
    return weights, args


def _hf_model(weights: dict[str, torch.Tensor], arch: Architecture, vocab_size: int, end_of_text: int | None) -> Any:
    """The Hugging Face model of `arch.family` holding `weights` (Megatron's names, one entry per layer)."""

    def first(*names: str) -> torch.Tensor:
        for name in names:
            if name in weights:
                return weights[name]
        raise NotExportable(f"the model has none of the parameters {names}")

    if arch.family == "llama":
        model_class, hf_config, state = _llama(weights, arch, vocab_size, end_of_text, first)
    else:
        model_class, hf_config, state = _gpt2(weights, arch, vocab_size, end_of_text, first)
    with torch.device("meta"):  # no random initialization (a second per 100M parameters): all is assigned below
        model = model_class(hf_config)
    state = {k: v.contiguous() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf_config.tie_word_embeddings)]
    if missing or unexpected:
        raise NotExportable(
            f"weights do not map onto {model_class.__name__}: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    if arch.family == "llama":  # the rotary angles, computed from the config: made again, off the meta device
        model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config)
    unset = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if unset:
        raise NotExportable(f"weights do not map onto {model_class.__name__}: no values for {unset}")
    if arch.family == "llama":
        _check_rotary(model, arch)
    return model.eval()


def _rope_parameters(arch: Architecture, head_dim: int) -> dict:
    """Llama's rotary settings giving Megatron's angles: its base, and its position interpolation (linear) or
    Llama 3 scaling, whose factor is the largest ratio of unscaled to scaled angle (the low frequencies')."""
    parameters: dict = {"rope_type": "default", "rope_theta": arch.rotary_base}
    unscaled = 1.0 / (arch.rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if arch.interpolation:
        parameters |= {"rope_type": "linear", "factor": float(arch.interpolation)}
    elif arch.inv_freq is not None and not torch.allclose(arch.inv_freq, unscaled, rtol=1e-6, atol=0):
        factor = float((unscaled / arch.inv_freq).max())
        parameters |= {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}  # fmt: skip
    return parameters


def _check_rotary(model: Any, arch: Architecture) -> None:
    """Refuses an export whose rotary angles are not Megatron's (a scaling Llama cannot express)."""
    rotary = model.model.rotary_emb
    ours = arch.inv_freq / (arch.interpolation or 1.0)
    if rotary.attention_scaling != 1.0 or not torch.allclose(rotary.inv_freq.float(), ours, rtol=1e-5, atol=0):
        raise NotExportable(
            "the rotary embedding's angles (base, interpolation, scaling) have no exact Llama equivalent"
        )


def _llama(weights, arch: Architecture, vocab_size: int, end_of_text: int | None, first) -> tuple:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, groups = arch.num_attention_heads, arch.num_query_groups
    qkv = weights["decoder.layers.0.self_attention.linear_qkv.weight"]
    head_dim = qkv.shape[0] // (heads + 2 * groups)
    fc1 = weights["decoder.layers.0.mlp.linear_fc1.weight"]
    hf_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=fc1.shape[1],
        intermediate_size=fc1.shape[0] // 2,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=arch.layernorm_epsilon,
        tie_word_embeddings=arch.tied_embeddings,
        rope_parameters=_rope_parameters(arch, head_dim),
        attention_bias=arch.biases,
        mlp_bias=arch.biases,
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
    )
    state = {
        "model.embed_tokens.weight": weights["embedding.word_embeddings.weight"][:vocab_size],
        "model.norm.weight": weights["decoder.final_layernorm.weight"],
    }
    if not arch.tied_embeddings:
        state["lm_head.weight"] = weights["output_layer.weight"][:vocab_size]
    for i in range(arch.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        query, key, value = _qkv_split(weights[m + "self_attention.linear_qkv.weight"], heads, groups)
        gate, up = weights[m + "mlp.linear_fc1.weight"].chunk(2)  # Megatron's SwiGLU: silu(first half) x second
        norm1 = first(m + "input_layernorm.weight", m + "self_attention.linear_qkv.layer_norm_weight")
        norm2 = first(m + "pre_mlp_layernorm.weight", m + "mlp.linear_fc1.layer_norm_weight")
        state |= {
            h + "input_layernorm.weight": norm1,
            h + "post_attention_layernorm.weight": norm2,
            h + "self_attn.q_proj.weight": query,
            h + "self_attn.k_proj.weight": key,
            h + "self_attn.v_proj.weight": value,
            h + "self_attn.o_proj.weight": weights[m + "self_attention.linear_proj.weight"],
            h + "mlp.gate_proj.weight": gate,
            h + "mlp.up_proj.weight": up,
            h + "mlp.down_proj.weight": weights[m + "mlp.linear_fc2.weight"],
        }  # fmt: skip
        if arch.biases:
            query, key, value = _qkv_split(weights[m + "self_attention.linear_qkv.bias"], heads, groups)
            gate, up = weights[m + "mlp.linear_fc1.bias"].chunk(2)
            state |= {
                h + "self_attn.q_proj.bias": query,
                h + "self_attn.k_proj.bias": key,
                h + "self_attn.v_proj.bias": value,
                h + "self_attn.o_proj.bias": weights[m + "self_attention.linear_proj.bias"],
                h + "mlp.gate_proj.bias": gate,
                h + "mlp.up_proj.bias": up,
                h + "mlp.down_proj.bias": weights[m + "mlp.linear_fc2.bias"],
            }
    return LlamaForCausalLM, hf_config, state


def _gpt2(weights, arch: Architecture, vocab_size: int, end_of_text: int | None, first) -> tuple:
    from transformers import GPT2Config, GPT2LMHeadModel

    heads = arch.num_attention_heads
    fc1 = weights["decoder.layers.0.mlp.linear_fc1.weight"]
    hf_config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=weights["embedding.position_embeddings.weight"].shape[0],
        n_embd=fc1.shape[1],
        n_layer=arch.num_layers,
        n_head=heads,
        n_inner=fc1.shape[0],
        activation_function="gelu_new" if arch.tanh_gelu else "gelu",
        layer_norm_epsilon=arch.layernorm_epsilon,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=arch.tied_embeddings,
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
    )
    state = {
        "transformer.wte.weight": weights["embedding.word_embeddings.weight"][:vocab_size],
        "transformer.wpe.weight": weights["embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": weights["decoder.final_layernorm.weight"],
        "transformer.ln_f.bias": weights["decoder.final_layernorm.bias"],
    }
    if not arch.tied_embeddings:
        state["lm_head.weight"] = weights["output_layer.weight"][:vocab_size]
    for i in range(arch.num_layers):
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
    return GPT2LMHeadModel, hf_config, state


def gpt2_tokenizer(vocab_file: str | Path, merge_file: str | Path, end_of_text: str = "<|endoftext|>") -> Any:
    """A Hugging Face fast tokenizer from GPT-2-format `vocab.json` and `merges.txt` files."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(str(vocab_file), str(merge_file))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=end_of_text, eos_token=end_of_text, unk_token=end_of_text
    )


EXPORTABLE_TOKENIZERS = ("GPT2BPETokenizer", "HuggingFaceTokenizer")
"""The `--tokenizer-type`s an exported folder can hold exactly: GPT-2 BPE files, or the Hugging Face tokenizer
Megatron wraps."""


def tokenizer_problem(args: Any) -> tuple[str, str | None] | None:
    """Why the tokenizer of a run with Megatron arguments `args` cannot go into an exported folder, and the flag
    of the missing file if that is why (None for a tokenizer type that cannot be exported); None when it can."""
    tokenizer_type = getattr(args, "tokenizer_type", None)
    if tokenizer_type not in EXPORTABLE_TOKENIZERS:
        return f"the run's --tokenizer-type is {tokenizer_type}, not one of {', '.join(EXPORTABLE_TOKENIZERS)}", None
    if tokenizer_type == "GPT2BPETokenizer":
        for flag, value in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
            if not value or not Path(value).is_file():
                return f"the run's {flag} {value!r} is not a file", flag
    return None


def hf_tokenizer(args: Any, megatron_tokenizer: Any) -> Any:
    """The Hugging Face tokenizer an exported folder holds for the run: a fast tokenizer of its GPT-2 BPE files
    (`--tokenizer-type GPT2BPETokenizer`), or the very tokenizer Megatron's `HuggingFaceTokenizer` wraps (its
    `--tokenizer-model`, with the run's special tokens), so that the folder encodes text as training did.
    `megatron_tokenizer` is the run's Megatron tokenizer; `args` have no `tokenizer_problem`."""
    if args.tokenizer_type == "GPT2BPETokenizer":
        return gpt2_tokenizer(args.vocab_file, args.merge_file)
    wrapped = getattr(getattr(megatron_tokenizer, "_tokenizer", None), "tokenizer", None)
    if wrapped is None or not hasattr(wrapped, "save_pretrained"):
        raise NotExportable(
            f"the run's HuggingFaceTokenizer ({type(megatron_tokenizer).__name__}) wraps no Hugging Face tokenizer"
        )
    return wrapped


def _save(model: Any, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


class SnapshotExport:
    """Writes the weights of each evaluated save as a Hugging Face model folder (GPT-2 or Llama) with the run's
    tokenizer, `<folder>/iter_NNNNNNN`.

    The weights are the ones the benchmarks ran on, in memory: the live model under the sync placement,
    the eval process's copy of the snapshot under the async one; no checkpoint is read. `check` refuses,
    before training starts, a model that is neither GPT-2 nor Llama, or a tokenizer that is neither GPT-2's
    BPE files nor a Hugging Face tokenizer (`EXPORTABLE_TOKENIZERS`)."""

    def __init__(self, folder: str | Path, megatron_args: Any):
        self.folder = Path(folder)
        self.args = megatron_args
        self._tokenizer: Any = None  # made at the first export, then kept

    @classmethod
    def check(cls, folder: str | Path, megatron_args: Any, where: str) -> SnapshotExport:
        """For a run with these Megatron arguments; raises `ConfigError` naming `export_hf` and the fix."""
        from megatron_eval_hook.config import ConfigError

        def refuse(reason: str, fix: str) -> ConfigError:
            return ConfigError(f"{where}: export_hf={str(folder)!r}: {reason}. Fix: {fix}")

        try:
            Architecture.of_args(megatron_args)
        except NotExportable as error:
            raise refuse(str(error), "set export_hf=null; only GPT-2 and Llama models can be exported") from error
        problem = tokenizer_problem(megatron_args)
        if problem:
            reason, flag = problem
            raise refuse(
                reason,
                f"pass {flag}, or set export_hf=null"
                if flag
                else "set export_hf=null; an exported folder holds GPT-2 BPE files or a Hugging Face tokenizer",
            )
        save = getattr(megatron_args, "save", None)
        if save and Path(folder).resolve() == Path(save).resolve():
            raise refuse(
                "it is the run's --save folder, whose iter_NNNNNNN folders are the checkpoints",
                "name a folder of its own, e.g. export_hf=<--save>/hf",
            )
        return cls(Path(folder).resolve(), megatron_args)

    def write(self, gpt: Any, tokenizer: Any, iteration: int) -> Path:
        """The model and tokenizer folder of `gpt`'s weights saved at `iteration`; `tokenizer` is the run's
        Megatron tokenizer. Written under a temporary name and renamed, so a folder that exists is complete."""
        import shutil

        from megatron_eval_hook.checkpoints import iteration_folder

        out = iteration_folder(self.folder, iteration)  # named as the checkpoint of the same iteration
        if out.exists() and not (out / "config.json").is_file():
            raise FileExistsError(f"{out} exists and is not a Hugging Face model folder; it is left as it is")
        partial = out.with_name(f".{out.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        if self._tokenizer is None:
            self._tokenizer = hf_tokenizer(self.args, tokenizer)
        exported = self._tokenizer
        _save(to_hf(gpt, vocab_size=len(exported), end_of_text=exported.eos_token_id), exported, partial)
        shutil.rmtree(out, ignore_errors=True)  # a job restarted from an earlier checkpoint saves it again
        partial.rename(out)
        return out


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    vocab_file: str | Path | None = None,
    merge_file: str | Path | None = None,
    tokenizer_model: str | Path | None = None,
) -> Path:
    """Write a Hugging Face folder (GPT-2 or Llama model, and the run's tokenizer) for a torch_dist checkpoint.

    The tokenizer is the checkpoint's (`--tokenizer-type`, and its `--vocab-file`/`--merge-file` or
    `--tokenizer-model`); the file arguments given here replace those stored in the checkpoint."""
    from megatron_eval_hook.checkpoints import checkpoint_folder
    from megatron_eval_hook.loading import build_run_tokenizer, single_device_args

    weights, stored = read_checkpoint(checkpoint)
    arch = Architecture.of_args(stored)
    args = single_device_args(
        stored,
        vocab_file=None if vocab_file is None else str(vocab_file),
        merge_file=None if merge_file is None else str(merge_file),
        tokenizer_model=None if tokenizer_model is None else str(tokenizer_model),
    )
    problem = tokenizer_problem(args)
    if problem:
        reason, flag = problem
        raise FileNotFoundError(f"{reason}; pass it with {flag}") if flag else NotExportable(reason)
    gpt2 = args.tokenizer_type == "GPT2BPETokenizer"
    megatron_tokenizer = None if gpt2 else build_run_tokenizer(args, checkpoint_folder(checkpoint))
    tokenizer = hf_tokenizer(args, megatron_tokenizer)
    out = Path(out)
    _save(_hf_model(weights, arch, len(tokenizer), tokenizer.eos_token_id), tokenizer, out)
    return out
