"""An unmodified pretraining script, shaped like Megatron-LM's pretrain_gpt.py main block: it
knows nothing of the hook. `python -m megatron_eval_hook.launch` must add the flags and the hook."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "pretrain_gpt2"))

import pretrain_gpt2  # noqa: E402  (applies the CPU shims without a GPU)
from megatron.core.enums import ModelType  # noqa: E402
from megatron.training import pretrain  # noqa: E402
from megatron.training.argument_utils import pretrain_cfg_container_from_args  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402

if __name__ == "__main__":
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    pretrain(
        pretrain_cfg_container_from_args(args),
        pretrain_gpt2.train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        pretrain_gpt2.forward_step,
        model_provider=pretrain_gpt2.model_provider,
    )
