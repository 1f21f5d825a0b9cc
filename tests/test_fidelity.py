"""Same weights, same requests: this project's engine and HELM's own HuggingFaceClient agree."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
import torch
from demo_data import load_megatron_tokenizer
from test_export import megatron_gpt2

from megatron_eval_hook.engine import Engine
from megatron_eval_hook.export import gpt2_tokenizer, to_hf_gpt2
from megatron_eval_hook.helm.benchmarks import resolve_benchmarks
from megatron_eval_hook.helm.client import InProcessModel, MegatronTokenizer, register_model
from megatron_eval_hook.helm.runner import HelmSuite

pytestmark = pytest.mark.slow

ENTRIES = [
    "boolq",
    "narrative_qa",
    "joint=mmlu:subject=demo_facts,method=multiple_choice_joint",
    "separate=mmlu:subject=demo_facts,method=multiple_choice_separate_original",
    "hellaswag=commonsense:dataset=hellaswag,method=multiple_choice_separate_original",
]
WINDOW, INSTANCES, VOCAB = 512, 4, 2048


def register_hf_deployment(folder: Path) -> str:
    """HELM's reference path: its HuggingFaceClient and HuggingFaceTokenizer on a local folder."""
    from helm.benchmark.model_deployment_registry import ClientSpec, ModelDeployment, register_model_deployment
    from helm.benchmark.model_metadata_registry import TEXT_MODEL_TAG, ModelMetadata, register_model_metadata
    from helm.benchmark.tokenizer_config_registry import TokenizerConfig, TokenizerSpec, register_tokenizer_config

    name = "reference/exported-gpt2"
    register_model_metadata(
        ModelMetadata(name=name, creator_organization_name="reference", display_name=name, description="",
                      access="open", release_date=date.today(), tags=[TEXT_MODEL_TAG])
    )  # fmt: skip
    register_tokenizer_config(
        TokenizerConfig(
            name=f"{name}-tokenizer",
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
            name=name, model_name=name, tokenizer_name=f"{name}-tokenizer", max_sequence_length=WINDOW,
            client_spec=ClientSpec(
                class_name="helm.clients.huggingface_client.HuggingFaceClient",
                args={"pretrained_model_name_or_path": str(folder), "device": "cpu"},
            ),
        )
    )  # fmt: skip
    return name


def run_reference(specs, output: Path, data_dir: Path, deployment: str) -> Path:
    from dataclasses import replace

    from helm.benchmark.executor import ExecutionSpec
    from helm.benchmark.runner import Runner, set_benchmark_output_path
    from helm.common.authentication import Authentication

    (output / "scenarios").mkdir(parents=True)
    for scenario in data_dir.iterdir():
        (output / "scenarios" / scenario.name).symlink_to(scenario)
    set_benchmark_output_path(str(output))
    spec = ExecutionSpec(url=None, auth=Authentication(""), local_path=str(output / "prod_env"), parallelism=1)
    runner = Runner(
        spec,
        str(output),
        "iter_0000001",
        skip_instances=False,
        cache_instances=False,
        cache_instances_only=False,
        skip_completed_runs=False,
        exit_on_error=True,
    )  # HELM's plain Runner and Executor: the reference path, no batching
    for run_spec in specs:
        adapter = replace(run_spec.adapter_spec, model=deployment, model_deployment=deployment)
        runner.run_one(replace(run_spec, adapter_spec=adapter))  # same run name, other output folder
    return Path(runner.runs_path)


@pytest.fixture(scope="module")
def both_paths(megatron_world, demo_data, tmp_path_factory):

    tmp = tmp_path_factory.mktemp("fidelity")
    # Large random weights: outputs that depend on the prompt, not one token repeated everywhere.
    model = megatron_gpt2(VOCAB, max_sequence_length=WINDOW, init_std=0.5)
    tokenizer = load_megatron_tokenizer(demo_data.vocab_file, demo_data.merge_file, demo_data.root)
    ours = InProcessModel(
        Engine(model, vocab_size=VOCAB, max_sequence_length=WINDOW, batch_size=8, end_of_text=tokenizer.eod),
        MegatronTokenizer(tokenizer),
    )
    register_model("fidelity", ours)
    suite = HelmSuite(resolve_benchmarks(ENTRIES), model_key="fidelity", data_dir=demo_data.helm_dir,
                      output_dir=tmp / "ours", max_sequence_length=WINDOW, max_eval_instances=INSTANCES)  # fmt: skip
    outcomes = list(suite.evaluate(ours, iteration=1))
    assert all(not isinstance(metrics, Exception) for _, metrics, _ in outcomes), outcomes
    folder = tmp / "hf"
    hf_tokenizer = gpt2_tokenizer(demo_data.vocab_file, demo_data.merge_file)
    to_hf_gpt2(model, vocab_size=VOCAB, end_of_text=hf_tokenizer.eos_token_id).save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    specs = [spec for prepared in suite.benchmarks for spec in prepared.run_specs]
    theirs = run_reference(specs, tmp / "theirs", demo_data.helm_dir, register_hf_deployment(folder))
    return tmp / "ours" / "helm" / "runs" / "iter_0000001", theirs, specs


def request_states(runs: Path, spec) -> list[dict]:
    return json.loads((runs / spec.name / "scenario_state.json").read_text())["request_states"]


def main_stats(runs: Path, spec) -> dict:
    stats = json.loads((runs / spec.name / "stats.json").read_text())
    return {
        (s["name"]["name"], s["name"].get("split")): s["mean"]
        for s in stats
        if "perturbation" not in s["name"] and s["name"]["name"] in ("exact_match", "quasi_exact_match", "f1_score")
    }


def is_separate(spec) -> bool:
    return spec.adapter_spec.method.startswith("multiple_choice_separate")


def test_generation_and_joint_runs_give_identical_completions(both_paths):
    ours, theirs, specs = both_paths
    for spec in filter(lambda s: not is_separate(s), specs):
        mine, reference = request_states(ours, spec), request_states(theirs, spec)
        assert [s["request"]["prompt"] for s in mine] == [s["request"]["prompt"] for s in reference]
        assert [s["result"]["completions"][0]["text"] for s in mine] == [
            s["result"]["completions"][0]["text"] for s in reference
        ], spec.name


def answer_length(state: dict, tokenizer) -> int:
    """How many final tokens of a separate request HELM reads: those of " <answer>" (basic_metrics.py)."""
    answer = state["instance"]["references"][state["reference_index"]]["output"]["text"]
    return len(tokenizer.tokenize(f" {answer}"))


def test_separate_runs_give_the_same_logprobs(both_paths, demo_data):
    ours, theirs, specs = both_paths
    tokenizer = load_megatron_tokenizer(demo_data.vocab_file, demo_data.merge_file, demo_data.root)
    for spec in filter(is_separate, specs):
        for mine, reference in zip(request_states(ours, spec), request_states(theirs, spec), strict=True):
            a = [t["logprob"] for t in mine["result"]["completions"][0]["tokens"]]
            b = [t["logprob"] for t in reference["result"]["completions"][0]["tokens"]]
            read = answer_length(mine, tokenizer)  # the engine computes only these
            assert len(a) == len(b) and 0 < read < len(a)
            assert torch.allclose(torch.tensor(a[-read:]), torch.tensor(b[-read:]), atol=1e-4), spec.name


def test_aggregate_scores_are_identical(both_paths):
    ours, theirs, specs = both_paths
    for spec in specs:
        assert main_stats(ours, spec) == main_stats(theirs, spec), spec.name
