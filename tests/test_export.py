"""Megatron GPT-2 → Hugging Face GPT-2: the exported model computes the same log-probabilities."""

from __future__ import annotations

import pytest
import torch

from megatron_eval_hook.export import NotGPT2, to_hf_gpt2


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
    hf = to_hf_gpt2(model, vocab_size=vocab)
    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = torch.log_softmax(hf(tokens).logits.float(), -1)
    ours = megatron_logprobs(model, tokens, vocab)
    assert theirs.shape == ours.shape == (2, 40, vocab)
    assert torch.allclose(theirs, ours, atol=1e-4), float((theirs - ours).abs().max())


def test_a_model_that_is_not_gpt2_is_refused(megatron_world):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True, normalization="RMSNorm"
    )
    rope = GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=80, max_sequence_length=64,
        position_embedding_type="rope",
    )  # fmt: skip
    with pytest.raises(NotGPT2, match="rope.*RMSNorm"):
        to_hf_gpt2(rope, vocab_size=77)


def save_checkpoint(model, folder, vocab_file, merge_file):
    """A torch_dist checkpoint of `model` as Megatron writes it: sharded tensors plus its args."""
    import argparse

    from megatron.core import dist_checkpointing

    config = model.config
    args = argparse.Namespace(
        num_layers=config.num_layers, num_attention_heads=config.num_attention_heads, num_query_groups=None,
        layernorm_epsilon=config.layernorm_epsilon, position_embedding_type="learned_absolute",
        normalization="LayerNorm", swiglu=False, group_query_attention=False, add_bias_linear=True,
        bias_gelu_fusion=False, untie_embeddings_and_output_weights=False,
        vocab_file=str(vocab_file), merge_file=str(merge_file),
    )  # fmt: skip
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
