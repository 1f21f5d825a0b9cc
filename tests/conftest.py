"""Shared fixtures: a real Megatron GPTModel on CPU (gloo, world size 1) and a char tokenizer."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from megatron_eval_hook import cpu_shims

cpu_shims.apply()

import torch  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "pretrain_gpt2"
sys.path.insert(0, str(EXAMPLES))  # the demo's data generator and CPU command lines

from cpu_run import free_port  # noqa: E402


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


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, one process) with Megatron's model-parallel state, TP=PP=1."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    initialize_rng_tracker()
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
