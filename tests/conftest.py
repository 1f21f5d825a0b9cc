"""Shared fixtures: a real Megatron GPTModel on CPU (gloo, world size 1), a char tokenizer, the demo's data
and a tiny GPT-2 trained on it."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from megatron_eval_hook import cpu_shims

cpu_shims.apply()

import torch  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "pretrain_gpt2"
sys.path.insert(0, str(EXAMPLES))  # the demo's data generator and CPU command lines


@pytest.fixture(autouse=True)
def _hermetic_wandb(tmp_path, monkeypatch):
    """W&B offline, writing only under the test's temporary folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    for variable, folder in (
        ("WANDB_DIR", "wandb"),
        ("WANDB_CACHE_DIR", "wandb-cache"),
        ("WANDB_DATA_DIR", "wandb-data"),
        ("WANDB_CONFIG_DIR", "wandb-config"),
    ):
        monkeypatch.setenv(variable, str(tmp_path / folder))
    yield
    if "wandb" in sys.modules:  # W&B keeps its settings (the folders above) process-wide until torn down
        sys.modules["wandb"].teardown()


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, one process) with Megatron's model-parallel state, TP=PP=1."""
    from megatron_eval_hook.loading import ensure_single_process

    ensure_single_process(seed=0)
    yield


CHARS = "\n !\"',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


class CharTokenizer:
    """One token per character of CHARS; id len(CHARS) is the end of text."""

    vocab_size = len(CHARS) + 1
    eod = len(CHARS)

    def encode(self, text: str) -> list[int]:
        return [CHARS.index(c) if c in CHARS else CHARS.index("?") for c in text]

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(CHARS[t] if t < len(CHARS) else "" for t in tokens)


def tiny_gpt(
    vocab_size: int,
    max_sequence_length: int = 256,
    seed: int = 0,
    position_embedding_type: str = "learned_absolute",
    **config: object,
):
    """A 2-layer GPT-2-style Megatron GPTModel on CPU, in eval mode; `config`: TransformerConfig overrides."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(seed)
    settings = dict(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    model = GPTModel(
        TransformerConfig(**{**settings, **config}),
        get_gpt_layer_local_spec(),
        vocab_size=vocab_size + 3,  # padded like Megatron's, to check the padding is never predicted
        max_sequence_length=max_sequence_length,
        position_embedding_type=position_embedding_type,
    )
    return model.eval()


def tiny_llama(vocab_size: int, max_sequence_length: int = 256, seed: int = 0, model: dict | None = None, **config):
    """A 2-layer Llama-style Megatron GPTModel on CPU, in eval mode: rotary positions, SwiGLU, RMSNorm,
    grouped-query attention (2 query groups), no biases, untied embeddings. `model`: GPTModel overrides
    (rotary_percent, rope_scaling, ...); `config`: TransformerConfig overrides."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(seed)
    settings = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        init_method_std=0.3, use_cpu_initialization=True,
    )  # fmt: skip
    gpt = GPTModel(
        TransformerConfig(**{**settings, **config}),
        get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=bool(config.get("qk_layernorm"))),
        vocab_size=vocab_size + 3,
        max_sequence_length=max_sequence_length,
        **{"position_embedding_type": "rope", "share_embeddings_and_output_weights": False, **(model or {})},
    )
    return gpt.eval()


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def gpt(megatron_world, char_tokenizer):
    return tiny_gpt(char_tokenizer.vocab_size, max_sequence_length=1024)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo's generated data (corpus, tokenizer, .bin/.idx, HELM files), made once per session."""
    from demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo-data"))


TRAINED_WINDOW = 256
"""Context window of `trained_gpt2` and `trained_llama`, in tokens."""

TRAINED_PADDING = 47
"""Padded vocabulary rows of the trained models: as many as Megatron adds to GPT-2's 50257 tokens (50304)."""


@pytest.fixture(scope="session")
def trained_gpt2(megatron_world, demo_data):
    """A tiny GPT-2 Megatron GPTModel trained on the demo corpus (`train_tiny`); shared: do not modify it."""
    return train_tiny(demo_data, "gpt2")


@pytest.fixture(scope="session")
def trained_llama(megatron_world, demo_data):
    """A tiny Llama-style Megatron GPTModel trained on the demo corpus (`train_tiny`); shared: do not modify it."""
    return train_tiny(demo_data, "llama")


def tiny_architecture(arch: str, vocab_size: int, length: int):
    """The untrained model `train_tiny` trains: 2 layers, 64 wide, 4 heads, a padded vocabulary.

    "gpt2": learned absolute positions, LayerNorm, GELU, biases, tied embeddings. "llama": rotary
    positions, RMSNorm, SwiGLU (ffn 128), grouped-query attention with 2 query groups, no biases,
    untied embeddings."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    common = dict(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                  hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    if arch == "gpt2":
        config, spec, position, tied = TransformerConfig(**common), get_gpt_layer_local_spec(), "learned_absolute", True
    elif arch == "llama":
        config = TransformerConfig(
            **common, num_query_groups=2, ffn_hidden_size=128, normalization="RMSNorm", gated_linear_unit=True,
            activation_func=F.silu, add_bias_linear=False,
        )  # fmt: skip
        spec, position, tied = get_gpt_layer_local_spec(normalization="RMSNorm"), "rope", False
    else:
        raise ValueError(f"unknown architecture {arch!r}: gpt2 or llama")
    return GPTModel(
        config,
        spec,
        vocab_size=vocab_size + TRAINED_PADDING,
        max_sequence_length=length,
        position_embedding_type=position,
        share_embeddings_and_output_weights=tied,
    )


def train_tiny(data, arch: str, *, steps: int = 800, batch_size: int = 2, lr: float = 3e-3, seed: int = 0):
    """A 2-layer, 64-wide Megatron GPTModel of architecture `arch` (`tiny_architecture`), trained on CPU on
    the demo's data; in eval mode.

    Trained by this plain loop rather than by Megatron's training loop: the loop's checkpoints in
    this suite come from a few iterations (not trained), and training long enough to learn through
    torchrun would add minutes. This loop reads what Megatron's reads, the demo's indexed dataset
    (documents joined by end-of-document tokens), in random windows of TRAINED_WINDOW tokens, so
    every position HELM's prompts use is trained. 800 AdamW steps of 2 windows (0.4 M tokens, about
    three quarters of the corpus; small batches learn far more per token here than large ones)
    take about 20 s of CPU time. Either model then knows the demo's facts (nearly all 60
    ``demo_facts`` questions right by HELM's separate-choice scoring) and continues HELM's prompts
    with varied, corpus-like text; it is a poor reader (its BoolQ and MMLU-joint answers are mostly
    one guess), which does not matter for comparing two implementations.

    The loss covers the tokenizer's vocabulary only, as the engine and the Hugging Face export do:
    the padded rows are never input and never in the loss, so they keep their random initial
    values, and an engine that let them into the softmax moves log-probabilities by up to about
    1e-2 on these models (see the fidelity test's mutant checks). Seeded: the same weights on every
    run on the same machine.
    """
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    vocab_size, length = 2048, TRAINED_WINDOW  # the demo tokenizer's vocabulary
    torch.manual_seed(seed)
    model = tiny_architecture(arch, vocab_size, length)
    documents = IndexedDataset(str(data.data_prefix))
    stream = torch.from_numpy(np.concatenate([documents[i] for i in range(len(documents))]).astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    positions = torch.arange(length).expand(batch_size, length)
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1).view(1, 1, length, length)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - length - 1, (batch_size,), generator=generator).tolist()
        windows = torch.stack([stream[start : start + length + 1] for start in starts])
        for group in optimizer.param_groups:  # 20 steps of warmup, then linear decay to a tenth
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (1.0 - 0.9 * step / steps)
        logits = model(windows[:, :-1], positions, causal)[..., :vocab_size]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size).float(), windows[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def hooked(demo_data, tmp_path_factory):
    """A tiny run of Megatron's real training loop with the hook (tests/training_runs.py): 7 iterations,
    saves at 3, 6 and 7, each evaluated on boolq, facts and a benchmark that fails. Made once per session:
    (its folder, the finished process)."""
    from training_runs import data_with_a_broken_benchmark, hooked_run

    data_dir = data_with_a_broken_benchmark(demo_data, tmp_path_factory.mktemp("data"))
    return hooked_run(demo_data, tmp_path_factory.mktemp("hooked"), data_dir)
