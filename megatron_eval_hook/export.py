"""Megatron GPT-2 → Hugging Face `GPT2LMHeadModel`, from a live model or a checkpoint folder.

For models of the GPT-2 architecture that `examples/pretrain_gpt2` trains: learned absolute
positions, LayerNorm, GELU MLP, biases, full multi-head attention. Works with Megatron's local
and Transformer Engine layer specs (the latter fuse the layer norms into the next linear
layer), and with torch_dist checkpoints of any tensor/pipeline-parallel layout (PyTorch's
distributed checkpoint reader assembles the full tensors). The exported model computes the same
log-probabilities, which lets HELM's own Hugging Face client check this project's engine.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class NotGPT2(ValueError):
    """The Megatron model is not of the GPT-2 architecture; the message says which part differs."""


@dataclass(frozen=True)
class Architecture:
    """What the weights alone do not tell about a Megatron GPT-2."""

    num_layers: int
    num_attention_heads: int
    layernorm_epsilon: float
    tanh_gelu: bool  # Megatron's fused bias-GELU kernel is the tanh approximation, its plain path exact erf
    tied_embeddings: bool

    @classmethod
    def of_model(cls, gpt: Any) -> Architecture:
        config = gpt.config
        _refuse_if(
            position_embeddings=getattr(gpt, "position_embedding_type", "learned_absolute"),
            normalization=config.normalization,
            gated=config.gated_linear_unit or config.activation_func is not torch.nn.functional.gelu,
            grouped_queries=config.num_query_groups not in (None, config.num_attention_heads),
            biases=config.add_bias_linear,
        )
        return cls(
            config.num_layers,
            config.num_attention_heads,
            config.layernorm_epsilon,
            bool(config.bias_activation_fusion),
            bool(gpt.share_embeddings_and_output_weights),
        )

    @classmethod
    def of_args(cls, args: Any) -> Architecture:
        """From the Megatron arguments stored in a checkpoint."""
        _refuse_if(
            position_embeddings=args.position_embedding_type,
            normalization=args.normalization,
            gated=bool(args.swiglu or getattr(args, "squared_relu", False)),
            grouped_queries=bool(args.group_query_attention)
            and args.num_query_groups not in (None, args.num_attention_heads),
            biases=args.add_bias_linear,
        )
        return cls(
            args.num_layers,
            args.num_attention_heads,
            args.layernorm_epsilon,
            bool(args.bias_gelu_fusion),
            not args.untie_embeddings_and_output_weights,
        )


def _refuse_if(*, position_embeddings: str, normalization: str, gated: bool, grouped_queries: bool, biases: bool):
    problems = []
    if position_embeddings != "learned_absolute":
        problems.append(f"position embeddings are {position_embeddings!r}, not learned_absolute")
    if normalization != "LayerNorm":
        problems.append(f"normalization is {normalization}, not LayerNorm")
    if gated:
        problems.append("the MLP is not a plain GELU MLP")
    if grouped_queries:
        problems.append("attention uses grouped queries")
    if not biases:
        problems.append("linear layers have no biases")
    if problems:
        raise NotGPT2("not a GPT-2 model: " + "; ".join(problems))


def _qkv_to_hf(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Megatron's fused QKV rows are ordered (head, q|k|v, channel); GPT-2's are (q|k|v, head, channel)."""
    grouped = tensor.reshape(heads, 3, tensor.shape[0] // (3 * heads), *tensor.shape[1:])
    return grouped.transpose(0, 1).reshape(tensor.shape)


def to_hf_gpt2(gpt: Any, *, vocab_size: int, end_of_text: int | None = None) -> Any:
    """A `transformers.GPT2LMHeadModel` (fp32, eval mode) holding the weights of the live Megatron `gpt`.

    `vocab_size` is the tokenizer's vocabulary: the padded rows of Megatron's embedding are
    dropped, so neither model can predict them.
    """
    # copies: the Hugging Face model gets tensors of its own, never the live model's
    weights = {
        k: v.detach().to("cpu", torch.float32, copy=True)
        for k, v in gpt.state_dict().items()
        if "_extra_state" not in k
    }
    return _hf_gpt2(weights, Architecture.of_model(gpt), vocab_size, end_of_text)


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


def _hf_gpt2(weights: dict[str, torch.Tensor], arch: Architecture, vocab_size: int, end_of_text: int | None) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    def first(*names: str) -> torch.Tensor:
        for name in names:
            if name in weights:
                return weights[name]
        raise NotGPT2(f"the model has none of the parameters {names}")

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
    with torch.device("meta"):  # no random initialization (a second per 100M parameters): all is assigned below
        model = GPT2LMHeadModel(hf_config)
    state = {k: v.contiguous() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf_config.tie_word_embeddings)]
    if missing or unexpected:
        raise NotGPT2(f"weights do not map onto GPT-2: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    unset = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if unset:
        raise NotGPT2(f"weights do not map onto GPT-2: no values for {unset}")
    return model.eval()


def gpt2_tokenizer(vocab_file: str | Path, merge_file: str | Path, end_of_text: str = "<|endoftext|>") -> Any:
    """A Hugging Face fast tokenizer from GPT-2-format `vocab.json` and `merges.txt` files."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(str(vocab_file), str(merge_file))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=end_of_text, eos_token=end_of_text, unk_token=end_of_text
    )


def _missing_tokenizer_file(vocab_file: Any, merge_file: Any) -> tuple[str, Any] | None:
    """(flag, value) of the first of `--vocab-file`, `--merge-file` that is not a file; None when both are."""
    for flag, value in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
        if not value or not Path(value).is_file():
            return flag, value
    return None


def _save(model: Any, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


class SnapshotExport:
    """Writes the weights of each evaluated save as a Hugging Face GPT-2 folder, `<folder>/iter_NNNNNNN`.

    The weights are the ones the benchmarks ran on, in memory: the live model under the sync placement,
    the eval process's copy of the snapshot under the async one; no checkpoint is read. `check` refuses,
    before training starts, a model that is not GPT-2 or a tokenizer that is not GPT-2's BPE."""

    def __init__(self, folder: str | Path, vocab_file: str | Path, merge_file: str | Path):
        self.folder = Path(folder)
        self.vocab_file, self.merge_file = Path(vocab_file), Path(merge_file)
        self._tokenizer: Any = None  # made at the first export, then kept

    @classmethod
    def check(cls, folder: str | Path, megatron_args: Any, where: str) -> SnapshotExport:
        """For a run with these Megatron arguments; raises `ConfigError` naming `export_hf` and the fix."""
        from megatron_eval_hook.config import ConfigError

        def refuse(reason: str, fix: str) -> ConfigError:
            return ConfigError(f"{where}: export_hf={str(folder)!r}: {reason}. Fix: {fix}")

        try:
            Architecture.of_args(megatron_args)
        except NotGPT2 as error:
            raise refuse(str(error), "set export_hf=null; only GPT-2 models can be exported") from error
        tokenizer_type = getattr(megatron_args, "tokenizer_type", None)
        if tokenizer_type != "GPT2BPETokenizer":
            raise refuse(
                f"the run's --tokenizer-type is {tokenizer_type}, not GPT2BPETokenizer",
                "set export_hf=null; the exported folder holds a GPT-2 BPE tokenizer",
            )
        missing = _missing_tokenizer_file(megatron_args.vocab_file, megatron_args.merge_file)
        if missing:
            flag, value = missing
            raise refuse(f"the run's {flag} {value!r} is not a file", f"pass {flag}, or set export_hf=null")
        save = getattr(megatron_args, "save", None)
        if save and Path(folder).resolve() == Path(save).resolve():
            raise refuse(
                "it is the run's --save folder, whose iter_NNNNNNN folders are the checkpoints",
                "name a folder of its own, e.g. export_hf=<--save>/hf",
            )
        return cls(Path(folder).resolve(), megatron_args.vocab_file, megatron_args.merge_file)

    def write(self, gpt: Any, iteration: int) -> Path:
        """The model and tokenizer folder of `gpt`'s weights saved at `iteration`. Written under a
        temporary name and renamed, so a folder that exists is complete."""
        import shutil

        from megatron_eval_hook.checkpoints import iteration_folder

        out = iteration_folder(self.folder, iteration)  # named as the checkpoint of the same iteration
        if out.exists() and not (out / "config.json").is_file():
            raise FileExistsError(f"{out} exists and is not a Hugging Face model folder; it is left as it is")
        partial = out.with_name(f".{out.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        if self._tokenizer is None:
            self._tokenizer = gpt2_tokenizer(self.vocab_file, self.merge_file)
        tokenizer = self._tokenizer
        _save(to_hf_gpt2(gpt, vocab_size=len(tokenizer), end_of_text=tokenizer.eos_token_id), tokenizer, partial)
        shutil.rmtree(out, ignore_errors=True)  # a job restarted from an earlier checkpoint saves it again
        partial.rename(out)
        return out


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    vocab_file: str | Path | None = None,
    merge_file: str | Path | None = None,
) -> Path:
    """Write a Hugging Face GPT-2 folder (model and tokenizer) for a torch_dist checkpoint.

    The tokenizer files default to the checkpoint's `--vocab-file`/`--merge-file`."""
    weights, args = read_checkpoint(checkpoint)
    vocab_file, merge_file = vocab_file or args.vocab_file, merge_file or args.merge_file
    missing = _missing_tokenizer_file(vocab_file, merge_file)
    if missing:
        name, value = missing
        raise FileNotFoundError(f"tokenizer file {value!r} ({name} of the checkpoint) not found; pass it with {name}")
    tokenizer = gpt2_tokenizer(vocab_file, merge_file)
    out = Path(out)
    _save(_hf_gpt2(weights, Architecture.of_args(args), len(tokenizer), tokenizer.eos_token_id), tokenizer, out)
    return out
