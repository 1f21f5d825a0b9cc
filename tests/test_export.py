"""Megatron GPT-2 → Hugging Face GPT-2, Megatron Llama-style → Hugging Face Llama: the exported model computes
the same log-probabilities; what maps onto neither is refused with what differs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from megatron_eval_hook.export import NotExportable, to_hf


def megatron_gpt2(vocab_size: int, *, tied: bool = True, seed: int = 3):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(seed)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=vocab_size + 3,  # Megatron pads the vocabulary
        max_sequence_length=64,
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=tied,
    )
    with torch.no_grad():  # non-trivial layer norms and biases, so a mapping mistake shows
        for name, parameter in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def megatron_logprobs(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    n = tokens.shape[1]
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1).view(1, 1, n, n)
    with torch.no_grad():
        logits = model(tokens, torch.arange(n).unsqueeze(0), mask)
    return torch.log_softmax(logits[..., :vocab_size].float(), -1)


@pytest.mark.parametrize("tied", [True, False], ids=["tied embeddings", "untied"])
def test_the_exported_model_gives_the_same_logprobs(megatron_world, tied):
    vocab = 77
    model = megatron_gpt2(vocab, tied=tied)
    hf = to_hf(model, vocab_size=vocab)
    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = torch.log_softmax(hf(tokens).logits.float(), -1)
    ours = megatron_logprobs(model, tokens, vocab)
    assert theirs.shape == ours.shape == (2, 40, vocab)
    assert torch.allclose(theirs, ours, atol=1e-4), float((theirs - ours).abs().max())


LLAMA_VARIANTS = {
    "llama": {},
    "full attention, tied, biases": dict(
        num_query_groups=None, add_bias_linear=True, model=dict(share_embeddings_and_output_weights=True)
    ),
    "llama3 scaling": dict(model=dict(rope_scaling=True, rope_scaling_factor=8.0, rotary_base=500000)),
    "interpolated": dict(model=dict(seq_len_interpolation_factor=4.0)),
}


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_a_llama_style_model_exports_to_llama_with_the_same_logprobs(megatron_world, variant):
    from transformers import LlamaForCausalLM

    vocab = 77
    model = tiny_llama(vocab, **LLAMA_VARIANTS[variant])
    with torch.no_grad():  # non-trivial norms, so a mapping mistake shows
        for name, parameter in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    hf = to_hf(model, vocab_size=vocab)
    assert isinstance(hf, LlamaForCausalLM)
    tokens = torch.randint(0, vocab, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = torch.log_softmax(hf(tokens).logits.float(), -1)
    ours = megatron_logprobs(model, tokens, vocab)
    assert torch.allclose(theirs, ours, atol=1e-4), float((theirs - ours).abs().max())


@pytest.mark.parametrize(
    "changes, reason",
    [
        (dict(model=dict(rotary_percent=0.5)), "cover 0.5 of each head"),
        (dict(rotary_interleaved=True), "interleaved channel pairs"),
        (dict(qk_layernorm=True), "layer-normalized"),
        (dict(gated_linear_unit=False, activation_func=torch.nn.functional.gelu), "not SwiGLU"),
    ],
    ids=["half rotary", "interleaved", "qk layernorm", "gelu"],
)
def test_what_maps_onto_no_hugging_face_model_exactly_is_refused(megatron_world, changes, reason):
    with pytest.raises(NotExportable, match=f"as Llama: .*{reason}"):
        to_hf(tiny_llama(77, **changes), vocab_size=77)


def save_checkpoint(model, folder, vocab_file, merge_file, defaults: dict | None = None, **changes):
    """A torch_dist checkpoint of `model` as Megatron writes it: sharded tensors plus its args (`changes`:
    arguments other than a GPT-2's; `defaults`: the other arguments)."""
    import argparse

    from megatron.core import dist_checkpointing

    config = model.config
    gpt2 = dict(
        num_layers=config.num_layers, num_attention_heads=config.num_attention_heads, num_query_groups=None,
        layernorm_epsilon=config.layernorm_epsilon, position_embedding_type="learned_absolute",
        normalization="LayerNorm", swiglu=False, group_query_attention=False, add_bias_linear=True,
        bias_gelu_fusion=False, untie_embeddings_and_output_weights=False, tokenizer_type="GPT2BPETokenizer",
        vocab_file=vocab_file and str(vocab_file), merge_file=merge_file and str(merge_file),
    )  # fmt: skip
    args = argparse.Namespace(**{**(defaults or {}), **gpt2, **changes})
    state = model.sharded_state_dict()
    state["args"] = args
    folder.mkdir(parents=True)
    dist_checkpointing.save(state, str(folder))


def test_export_hf_writes_a_folder_transformers_loads_with_the_same_logprobs(megatron_world, demo_data, tmp_path):
    from demo_data import load_megatron_tokenizer
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from megatron_eval_hook.cli import main

    vocab = 2048  # the demo tokenizer's
    model = megatron_gpt2(vocab)
    save_checkpoint(model, tmp_path / "save" / "iter_0000005", demo_data.vocab_file, demo_data.merge_file)
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("5")

    assert main(["export-hf", "--checkpoint", str(tmp_path / "save"), "--out", str(tmp_path / "hf")]) == 0

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Favorite fruit of Ilsander pears. The cloak of Mirelle is blue."
    megatron_tokenizer = load_megatron_tokenizer(demo_data.vocab_file, demo_data.merge_file, demo_data.root)
    ids = tokenizer(text)["input_ids"]
    assert ids == megatron_tokenizer.tokenize(text)  # the same token ids as the run's tokenizer
    tokens = torch.tensor([ids])
    with torch.no_grad():
        theirs = torch.log_softmax(hf(tokens).logits.float(), -1)
    assert torch.allclose(theirs, megatron_logprobs(model, tokens, vocab), atol=1e-4)


def test_export_hf_names_a_missing_tokenizer_file(megatron_world, tmp_path, capsys):
    from megatron_eval_hook.cli import main

    save_checkpoint(megatron_gpt2(77), tmp_path / "iter_0000001", tmp_path / "gone.json", tmp_path / "gone.txt")
    assert main(["export-hf", "--checkpoint", str(tmp_path / "iter_0000001"), "--out", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err
    assert "gone.json" in error and "--vocab-file" in error


def llama_args(model) -> dict:
    """The Megatron arguments of a Llama-style run of `tiny_llama(..., rope_scaling=True, rotary_base=500000)`."""
    config = model.config
    return dict(
        position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
        group_query_attention=True, num_query_groups=config.num_query_groups, untie_embeddings_and_output_weights=True,
        kv_channels=config.kv_channels, hidden_size=config.hidden_size, rotary_base=500000, rotary_percent=1.0,
        rotary_interleaved=False, use_rope_scaling=True, rope_scaling_factor=8.0,
        rotary_seq_len_interpolation_factor=None, qk_layernorm=False,
    )  # fmt: skip


def test_export_hf_writes_a_llama_folder_for_a_llama_style_checkpoint(megatron_world, demo_data, tmp_path):
    from transformers import LlamaForCausalLM

    from megatron_eval_hook.cli import main

    vocab = 2048  # the demo tokenizer's
    model = tiny_llama(vocab, model=dict(rope_scaling=True, rope_scaling_factor=8.0, rotary_base=500000))
    llama = llama_args(model)
    save_checkpoint(model, tmp_path / "iter_0000003", demo_data.vocab_file, demo_data.merge_file, **llama)
    assert main(["export-hf", "--checkpoint", str(tmp_path / "iter_0000003"), "--out", str(tmp_path / "hf")]) == 0

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, vocab, (1, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = torch.log_softmax(hf(tokens).logits.float(), -1)
    assert torch.allclose(theirs, megatron_logprobs(model, tokens, vocab), atol=1e-4)


def test_export_hf_of_a_hugging_face_tokenizer_run_holds_the_tokenizer_training_used(
    megatron_world, demo_data, tmp_path
):
    """`--tokenizer-type HuggingFaceTokenizer`: the folder holds Megatron's own Hugging Face tokenizer, with the
    run's `--special-tokens`, so that it encodes text as training did; the model drops the padded rows only."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megatron_eval_hook.cli import main
    from megatron_eval_hook.export import gpt2_tokenizer
    from megatron_eval_hook.loading import build_run_tokenizer

    gpt2_tokenizer(demo_data.vocab_file, demo_data.merge_file).save_pretrained(tmp_path / "tokenizer")
    vocab = 2048 + 1  # the demo's BPE and one special token
    model = tiny_llama(vocab, model=dict(rope_scaling=True, rope_scaling_factor=8.0, rotary_base=500000))
    defaults = {**vars(add_megatron_arguments(argparse.ArgumentParser()).parse_args([])), "rank": 0}  # as saved
    run = dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tokenizer"),
               special_tokens=["<|turn|>"])  # fmt: skip
    save_checkpoint(model, tmp_path / "iter_0000004", None, None, defaults, **llama_args(model), **run)

    assert main(["export-hf", "--checkpoint", str(tmp_path / "iter_0000004"), "--out", str(tmp_path / "hf")]) == 0

    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    trained = build_run_tokenizer(argparse.Namespace(**{**defaults, **run}), tmp_path)
    text = "<|turn|>Favorite fruit of Ilsander pears.<|turn|> The cloak of Mirelle is blue."
    ids = exported(text)["input_ids"]
    assert ids == trained.tokenize(text) and 2048 in ids  # the special token is one token, as in training
    assert len(exported) == trained.vocab_size == vocab
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vocab_size == vocab
    tokens = torch.tensor([ids])
    with torch.no_grad():
        theirs = torch.log_softmax(hf(tokens).logits.float(), -1)
    assert torch.allclose(theirs, megatron_logprobs(model, tokens, vocab), atol=1e-4)


def test_export_hf_refuses_a_tokenizer_it_cannot_hold(megatron_world, tmp_path, capsys):
    from megatron_eval_hook.cli import main

    model = tiny_llama(77)
    save_checkpoint(model, tmp_path / "iter_0000001", None, None, **llama_args(model), tokenizer_type="NullTokenizer")
    assert main(["export-hf", "--checkpoint", str(tmp_path / "iter_0000001"), "--out", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err
    assert "--tokenizer-type is NullTokenizer, not one of GPT2BPETokenizer, HuggingFaceTokenizer" in error
    assert not (tmp_path / "hf").exists()
