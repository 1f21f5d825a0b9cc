"""Benchmark names, presets and named run entries."""

from __future__ import annotations

import pytest

from megatron_eval_hook.helm.benchmarks import LITE_MMLU_SUBJECTS, Benchmark, resolve_benchmarks


def test_the_default_preset_is_mmlu_boolq_narrativeqa_and_hellaswag():
    benchmarks = resolve_benchmarks(["default"])
    assert [b.name for b in benchmarks] == ["mmlu", "boolq", "narrative_qa", "hellaswag"]
    assert len(benchmarks[0].run_entries) == len(LITE_MMLU_SUBJECTS)


def test_a_bare_run_entry_is_its_own_benchmark_and_a_named_one_takes_its_name():
    benchmarks = resolve_benchmarks(["boolq", "facts=mmlu:subject=facts,method=multiple_choice_separate_original"])
    assert benchmarks == [
        Benchmark("boolq", ("boolq",)),
        Benchmark("facts", ("mmlu:subject=facts,method=multiple_choice_separate_original",)),
    ]


def test_entries_sharing_a_name_form_one_benchmark_and_duplicates_collapse():
    benchmarks = resolve_benchmarks(["m=mmlu:subject=a", "m=mmlu:subject=b", "m=mmlu:subject=a"])
    assert benchmarks == [Benchmark("m", ("mmlu:subject=a", "mmlu:subject=b"))]


def test_config_presets_can_use_other_presets():
    presets = {"mine": ["default", "extra=boolq"]}
    assert [b.name for b in resolve_benchmarks(["mine"], presets)][-1] == "extra"


def test_a_run_entry_that_names_a_model_is_refused():
    with pytest.raises(ValueError, match="names a model"):
        resolve_benchmarks(["boolq:model=openai/gpt2"])


def test_a_preset_that_includes_itself_is_refused():
    with pytest.raises(ValueError, match="includes itself"):
        resolve_benchmarks(["loop"], {"loop": ["boolq", "loop"]})
