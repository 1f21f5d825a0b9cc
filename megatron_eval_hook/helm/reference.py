"""HELM's own reference path for an exported model: its `HuggingFaceClient` and `HuggingFaceTokenizer`
on a local Hugging Face folder (`megatron-eval export-hf`), registered as a model deployment.

The hook's scores are checked against this path (tests/test_fidelity.py) and its speed is measured
against it (bench/throughput.py); it also lets a user run HELM's `Runner` on an exported checkpoint.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

# HELM `Runner` options of the hook's runner (helm/warm.py) and of the reference path: nothing cached
# or skipped (a cache would hand a new checkpoint the previous one's answers), the first error raised.
RUNNER_OPTIONS = dict(
    skip_instances=False,
    cache_instances=False,
    cache_instances_only=False,
    skip_completed_runs=False,
    exit_on_error=True,
)


def register_hf_deployment(
    folder: Path, *, name: str, max_sequence_length: int, device: str = "cpu", dtype: str = "float32"
) -> str:
    """Register `folder` with HELM as the local deployment `name`, offline, its weights loaded in `dtype` (a
    torch dtype's name); return the deployment's name."""
    from helm.benchmark.model_deployment_registry import ClientSpec, ModelDeployment, register_model_deployment
    from helm.benchmark.model_metadata_registry import TEXT_MODEL_TAG, ModelMetadata, register_model_metadata
    from helm.benchmark.tokenizer_config_registry import TokenizerConfig, TokenizerSpec, register_tokenizer_config

    organization = name.split("/", 1)[0]
    register_model_metadata(
        ModelMetadata(name=name, creator_organization_name=organization, display_name=name, description="",
                      access="open", release_date=date.today(), tags=[TEXT_MODEL_TAG])
    )  # fmt: skip
    tokenizer = f"{name}-tokenizer"
    register_tokenizer_config(
        TokenizerConfig(
            name=tokenizer,
            tokenizer_spec=TokenizerSpec(
                class_name="helm.tokenizers.huggingface_tokenizer.HuggingFaceTokenizer",
                args={"pretrained_model_name_or_path": str(folder)},
            ),
            end_of_text_token="<|endoftext|>",
            prefix_token="<|endoftext|>",
        )
    )
    register_model_deployment(
        ModelDeployment(
            name=name, model_name=name, tokenizer_name=tokenizer, max_sequence_length=max_sequence_length,
            client_spec=ClientSpec(
                class_name="helm.clients.huggingface_client.HuggingFaceClient",
                args={"pretrained_model_name_or_path": str(folder), "device": device, "dtype": dtype},
            ),
        )
    )  # fmt: skip
    return name


def plain_runner(helm_dir: Path, suite: str) -> object:
    """HELM's own `Runner` and `Executor` over `helm_dir` (no batching, no reuse), with the options the
    hook's runner uses: nothing cached or skipped, the first error raised."""
    from helm.benchmark.executor import ExecutionSpec
    from helm.benchmark.runner import Runner
    from helm.common.authentication import Authentication

    spec = ExecutionSpec(url=None, auth=Authentication(""), local_path=str(helm_dir / "prod_env"), parallelism=1)
    return Runner(spec, str(helm_dir), suite, **RUNNER_OPTIONS)
