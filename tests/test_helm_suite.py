"""HELM runs in-process on a real Megatron GPTModel through the hook's client, offline."""

from __future__ import annotations

import json

import pytest

from megatron_eval_hook.engine import Engine
from megatron_eval_hook.helm.benchmarks import resolve_benchmarks
from megatron_eval_hook.helm.client import InProcessModel, register_model
from megatron_eval_hook.helm.runner import BenchmarkError, HelmSuite

BENCHMARKS = ["boolq", "narrative_qa", "facts=mmlu:subject=demo_facts,method=multiple_choice_separate_original"]


class CountingEngine(Engine):
    """Counts forward passes, to tell batched evaluation from one pass per request."""

    forwards = 0

    def _forward(self, *args):
        CountingEngine.forwards += 1
        return super()._forward(*args)


def suite_for(tmp_path, demo_data, benchmarks, key="suite-test", **kwargs):
    return HelmSuite(
        resolve_benchmarks(benchmarks),
        model_key=key,
        data_dir=demo_data.helm_dir,
        output_dir=tmp_path,
        max_sequence_length=kwargs.pop("max_sequence_length", 1024),
        max_eval_instances=kwargs.pop("max_eval_instances", 4),
    )


@pytest.fixture
def in_process(gpt, char_tokenizer):
    model = InProcessModel(
        CountingEngine(gpt, vocab_size=char_tokenizer.vocab_size, max_sequence_length=1024, batch_size=16),
        char_tokenizer,
    )
    register_model("suite-test", model)
    return model


def test_every_benchmark_yields_its_main_metric_from_helm_stats(tmp_path, demo_data, in_process):
    suite = suite_for(tmp_path, demo_data, BENCHMARKS)
    outcomes = list(suite.evaluate(in_process, iteration=7))
    assert [p.name for p, _, _ in outcomes] == ["boolq", "narrative_qa", "facts"]
    for prepared, metrics, seconds in outcomes:
        assert not isinstance(metrics, Exception), metrics
        main = [m for m in metrics if (m.metric, m.split) == (prepared.main_metric, prepared.main_split)]
        assert len(main) == 1 and 0.0 <= main[0].value <= 1.0 and main[0].count > 0
        assert seconds > 0
    assert [(p.main_metric, p.main_split) for p, _, _ in outcomes] == [
        ("quasi_exact_match", "valid"),
        ("f1_score", "test"),
        ("exact_match", "test"),
    ]
    stats = tmp_path / "helm" / "runs" / "iter_0000007"
    assert len(list(stats.glob("*/stats.json"))) == 3


def test_scores_come_from_the_files_helm_wrote(tmp_path, demo_data, in_process):
    suite = suite_for(tmp_path, demo_data, ["boolq"])
    ((prepared, metrics, _),) = suite.evaluate(in_process, iteration=3)
    (stats_file,) = (tmp_path / "helm" / "runs" / "iter_0000003").glob("*/stats.json")
    on_disk = {
        (s["name"]["name"], s["name"].get("split")): s["mean"]
        for s in json.loads(stats_file.read_text())
        if "perturbation" not in s["name"] and "mean" in s
    }
    assert {(m.metric, m.split): m.value for m in metrics} == on_disk
    assert {m.count for m in metrics if m.split == "valid"} == {4}  # instances, not HELM's trial count


def test_requests_of_a_run_are_batched_not_answered_one_by_one(tmp_path, demo_data, in_process):
    suite = suite_for(
        tmp_path,
        demo_data,
        ["facts=mmlu:subject=demo_facts,method=multiple_choice_separate_original"],
        max_eval_instances=8,
    )
    CountingEngine.forwards = 0
    ((_, metrics, _),) = suite.evaluate(in_process, iteration=1)
    assert not isinstance(metrics, Exception)
    # 8 instances x 4 choices = 32 scoring requests, packed into one batch of rows
    assert CountingEngine.forwards == 1


def test_an_unknown_benchmark_is_refused_with_a_suggestion(tmp_path, demo_data, in_process):
    with pytest.raises(BenchmarkError, match="bolq.*Did you mean boolq"):
        suite_for(tmp_path, demo_data, ["bolq"])


def test_missing_data_names_the_missing_file_and_the_fix(tmp_path, demo_data, in_process):
    with pytest.raises(BenchmarkError) as error:
        suite_for(tmp_path, demo_data, ["mmlu:subject=anatomy"])
    assert "anatomy_test.csv" in str(error.value) and "data_dir" in str(error.value)


def test_a_benchmark_without_instances_fails_alone(tmp_path, demo_data, in_process):
    empty = tmp_path / "data"
    (empty / "mmlu" / "data" / "dev").mkdir(parents=True)
    (empty / "mmlu" / "data" / "test").mkdir(parents=True)
    (empty / "mmlu" / "data" / "dev" / "nothing_dev.csv").write_text("")
    (empty / "mmlu" / "data" / "test" / "nothing_test.csv").write_text("")
    for name in ("boolq",):
        (empty / name).symlink_to(demo_data.helm_dir / name)
    suite = HelmSuite(
        resolve_benchmarks(["mmlu:subject=nothing", "boolq"]),
        model_key="suite-test",
        data_dir=empty,
        output_dir=tmp_path / "out",
        max_sequence_length=1024,
        max_eval_instances=4,
    )
    (first, error, _), (second, metrics, _) = suite.evaluate(in_process, iteration=2)
    assert isinstance(error, BenchmarkError) and "zero instances" in str(error)
    assert not isinstance(metrics, Exception)
