"""HELM runs in-process on a real Megatron GPTModel through the hook's client, offline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CharTokenizer, tiny_gpt

from megatron_eval_hook.engine import Engine
from megatron_eval_hook.helm.benchmarks import resolve_benchmarks
from megatron_eval_hook.helm.client import InProcessModel, NonFiniteOutput, register_model
from megatron_eval_hook.helm.runner import BenchmarkError, HelmSuite

BENCHMARKS = ["boolq", "narrative_qa", "facts=mmlu:subject=demo_facts,method=multiple_choice_separate_original"]


class CountingEngine(Engine):
    """Counts forward passes, to tell batched evaluation from one pass per request."""

    forwards = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        backend = self.backend

        def counted(*args, **kwargs):
            CountingEngine.forwards += 1
            return backend(*args, **kwargs)

        self.backend = counted


def suite_for(
    tmp_path, demo_data, benchmarks, key="suite-test", *, data_dir=None, max_sequence_length=1024, max_eval_instances=4
):
    return HelmSuite(
        resolve_benchmarks(benchmarks),
        model_key=key,
        data_dir=data_dir or demo_data.helm_dir,
        output_dir=tmp_path,
        max_sequence_length=max_sequence_length,
        max_eval_instances=max_eval_instances,
    )


@pytest.fixture
def in_process(gpt, char_tokenizer):
    model = InProcessModel(
        CountingEngine(
            gpt,
            vocab_size=char_tokenizer.vocab_size,
            max_sequence_length=1024,
            batch_size=16,
            decode=char_tokenizer.decode,
        ),
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
    for prepared, metrics, _ in outcomes:  # each score is the mean of its per-instance values, kept for the ledger
        main = next(m for m in metrics if (m.metric, m.split) == (prepared.main_metric, prepared.main_split))
        (run,) = suite.instances[prepared.name]
        assert len(run) == main.count and len({instance for instance, *_ in run}) == main.count
        assert sum(value for _, value, *_ in run) / len(run) == pytest.approx(main.value)
    # facts scores each answer separately: its gold and best wrong answers' log-probs, and its early-signal scores
    ((facts_run,),) = [suite.instances[p.name] for p, _, _ in outcomes if p.name == "facts"]
    assert all(gold is not None and wrong is not None for _, _, gold, wrong in facts_run)
    ((boolq_run,),) = [suite.instances[p.name] for p, _, _ in outcomes if p.name == "boolq"]
    assert all(gold is None and wrong is None for _, _, gold, wrong in boolq_run)  # generated, not chosen
    (facts_metrics,) = [m for p, m, _ in outcomes if p.name == "facts"]
    signal = {m.metric: m for m in facts_metrics if m.metric in ("gold_bits_per_byte", "gold_margin")}
    margins = [gold - wrong for _, _, gold, wrong in facts_run]
    assert signal["gold_margin"].value == pytest.approx(sum(margins) / len(margins))
    assert signal["gold_bits_per_byte"].value > 0 and signal["gold_margin"].count == len(facts_run)


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


@pytest.mark.parametrize(
    "entry, reached",
    [
        ("imdb", "ai.stanford.edu"),  # a scenario the hook knows nothing of, its data folder empty
        ("boolq:data_augmentation=synonym", "raw.githubusercontent.com"),  # its perturbation downloads WordNet
    ],
)
def test_a_benchmark_that_would_download_is_refused_before_any_evaluation(tmp_path, demo_data, in_process, entry,
                                                                          reached):  # fmt: skip
    data = tmp_path / "data"
    (data / "imdb").mkdir(parents=True)
    (data / "boolq").symlink_to(demo_data.helm_dir / "boolq")
    with pytest.raises(BenchmarkError) as error:
        suite_for(tmp_path / "out", demo_data, [entry], data_dir=data)
    message = str(error.value)
    assert f"run entry {entry!r}" in message and "tried to download" in message and reached in message
    assert "Fix:" in message and str(data) in message


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


# Evaluations in a warm process: what is kept from one evaluation to the next must never be stale.


def metrics_of(outcomes) -> dict:
    """Every metric of every benchmark, but the timings, which differ from one run to the next."""
    table = {}
    for prepared, metrics, _ in outcomes:
        assert not isinstance(metrics, Exception), metrics
        for m in metrics:
            if "runtime" not in m.metric:
                table[(prepared.name, m.metric, m.split)] = (m.value, m.count)
    return table


def in_process_model(gpt, tokenizer, key="suite-test", window=1024) -> InProcessModel:
    model = InProcessModel(
        Engine(
            gpt,
            vocab_size=CharTokenizer.vocab_size,
            max_sequence_length=window,
            batch_size=16,
            decode=tokenizer.decode,
        ),
        tokenizer,
    )
    register_model(key, model)
    return model


def fresh_process_metrics(tmp_path, demo_data, gpt, benchmarks, **kwargs) -> subprocess.Popen:
    """Start `tests/helm_fresh_process.py` on the weights of `gpt`; `fresh_result` reads its metrics."""
    tmp_path.mkdir(parents=True)
    torch.save(gpt.state_dict(), tmp_path / "weights.pt")
    spec = {
        "model_key": "suite-test",
        "weights": str(tmp_path / "weights.pt"),
        "data_dir": str(demo_data.helm_dir),
        "output_dir": str(tmp_path / "out"),
        "benchmarks": benchmarks,
        "max_eval_instances": 4,
        "max_sequence_length": 1024,
        "iteration": 1,
        **kwargs,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    script = Path(__file__).parent / "helm_fresh_process.py"
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "spec.json")], stdout=subprocess.PIPE, text=True
    )


def fresh_result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0
    rows = json.loads(out.strip().splitlines()[-1])
    return {(b, metric, split): (value, count) for b, metric, split, value, count in rows if "runtime" not in metric}


CHEAP = ["boolq", "facts=mmlu:subject=demo_facts,method=multiple_choice_separate_original", "mmlu:subject=demo_facts"]


@pytest.mark.slow
def test_warm_evaluations_score_as_fresh_processes_do(tmp_path, demo_data, gpt, char_tokenizer):
    other = tiny_gpt(char_tokenizer.vocab_size, max_sequence_length=1024, seed=1)  # the next "checkpoint"
    fresh = [fresh_process_metrics(tmp_path / f"fresh{i}", demo_data, m, CHEAP) for i, m in enumerate([gpt, other])]
    suite = suite_for(tmp_path / "warm", demo_data, CHEAP)
    warm = []
    for iteration, weights in enumerate([gpt, other, gpt, other]):
        model = in_process_model(weights, char_tokenizer)
        warm.append(metrics_of(suite.evaluate(model, iteration)))
    first, second = (fresh_result(process) for process in fresh)
    assert first != second  # the checkpoints score differently, so the comparison can tell them apart
    assert warm == [first, second, first, second]


def test_requests_are_read_and_adapted_once(tmp_path, demo_data, in_process, monkeypatch):
    from megatron_eval_hook.helm import warm

    made = []
    original = warm._read_and_adapt
    monkeypatch.setattr(warm, "_read_and_adapt", lambda *args: made.append(args[2].name) or original(*args))
    suite = suite_for(tmp_path, demo_data, CHEAP)
    first = metrics_of(suite.evaluate(in_process, iteration=1))
    assert metrics_of(suite.evaluate(in_process, iteration=2)) == first
    assert len(made) == 3


def test_stats_and_files_are_those_of_helms_own_runner(tmp_path, demo_data, gpt, char_tokenizer):
    """The hook's runner against HELM's `Runner.run_one` with the hook's executor, on the same answers: every
    stat, but the timings and HELM's worst cases over the perturbations of runs without any; every file."""

    from megatron_eval_hook.helm.reference import plain_runner
    from megatron_eval_hook.helm.runner import _batching_runner

    entries = [*BENCHMARKS, "mmlu:subject=demo_facts", "boolq:only_contrast=True,data_augmentation=contrast_sets"]
    model = in_process_model(gpt, char_tokenizer, window=512)
    suite = suite_for(tmp_path, demo_data, entries, max_sequence_length=512, max_eval_instances=2)
    list(suite.evaluate(model, iteration=1))
    list(suite.evaluate(model, iteration=2))  # from the kept requests and tokenizations
    ours = tmp_path / "helm" / "runs" / "iter_0000002"
    reference = plain_runner(suite.helm_dir, "helm")  # HELM's run_one, answered by the hook's executor
    reference.executor = _batching_runner(model, suite.helm_dir, "helm", reuse=None).executor
    theirs = Path(reference.runs_path)

    def without_timings(value):
        if isinstance(value, dict):
            return {k: without_timings(v) for k, v in value.items() if k not in ("request_time", "request_datetime")}
        if isinstance(value, list):
            return [without_timings(v) for v in value if not (isinstance(v, dict) and "runtime" in str(v.get("name")))]
        return value

    def read(folder, spec, name):
        return without_timings(json.loads((folder / spec.name / name).read_text()))

    perturbed = 0
    for spec in (spec for prepared in suite.benchmarks for spec in prepared.run_specs):
        reference.run_one(spec)
        for name in ("run_spec.json", "scenario.json", "scenario_state.json", "per_instance_stats.json"):
            assert read(ours, spec, name) == read(theirs, spec, name), (spec.name, name)
        stats = read(theirs, spec, "stats.json")
        states = read(ours, spec, "scenario_state.json")["request_states"]
        if all(state["instance"].get("perturbation") is None for state in states):
            stats = [s for s in stats if "perturbation" not in s["name"]]  # the worst cases it leaves out
        else:
            perturbed += 1
        assert read(ours, spec, "stats.json") == stats, spec.name
    assert perturbed == 1


def test_changed_data_files_are_read_again(tmp_path, demo_data, in_process):
    data = tmp_path / "data"
    shutil.copytree(demo_data.helm_dir / "boolq", data / "boolq")
    suite = suite_for(tmp_path / "warm", demo_data, ["boolq"], data_dir=data)
    before = metrics_of(suite.evaluate(in_process, iteration=1))
    dev = data / "boolq" / "data" / "dev"
    dev.write_text("".join(dev.read_text().splitlines(keepends=True)[10:]))  # other instances get picked
    after = metrics_of(suite.evaluate(in_process, iteration=2))
    fresh = suite_for(tmp_path / "fresh", demo_data, ["boolq"], data_dir=data)
    assert after != before
    assert after == metrics_of(fresh.evaluate(in_process, iteration=2))


class DoubledCharTokenizer(CharTokenizer):
    """Two tokens per character: other prompt lengths, so other few-shot prompts fit the window."""

    def encode(self, text: str) -> list[int]:
        return [token for token in super().encode(text) for _ in (0, 1)]

    def decode(self, tokens) -> str:
        return super().decode(list(tokens)[::2])


def test_another_tokenizer_gets_prompts_fitted_with_it(tmp_path, demo_data, gpt, char_tokenizer):
    small = {"max_sequence_length": 600}  # too small for boolq's five examples: prompts are fitted
    suite = suite_for(tmp_path / "warm", demo_data, ["boolq"], **small)
    before = metrics_of(suite.evaluate(in_process_model(gpt, char_tokenizer, window=600), iteration=1))
    doubled = in_process_model(gpt, DoubledCharTokenizer(), window=600)
    after = metrics_of(suite.evaluate(doubled, iteration=2))
    fresh = suite_for(tmp_path / "fresh", demo_data, ["boolq"], **small)
    assert after[("boolq", "num_train_instances", "valid")] != before[("boolq", "num_train_instances", "valid")]
    assert after == metrics_of(fresh.evaluate(doubled, iteration=2))


def test_a_changed_config_is_never_served_another_configs_requests(tmp_path, demo_data, gpt, char_tokenizer):
    """Suites of other configs in one process, same model key and output folder, evaluated in turns,
    score as each one alone."""
    configs = [
        (["boolq"], {"max_eval_instances": 2}),
        (["boolq"], {"max_eval_instances": 3}),
        (["boolq"], {"max_eval_instances": 2, "max_sequence_length": 600}),
        (["facts=mmlu:subject=demo_facts,method=multiple_choice_separate_original"], {"max_eval_instances": 2}),
        (["facts=mmlu:subject=demo_facts,method=multiple_choice_joint"], {"max_eval_instances": 2}),
    ]

    def evaluate(suite, options, iteration):
        model = in_process_model(gpt, char_tokenizer, window=options.get("max_sequence_length", 1024))
        return metrics_of(suite.evaluate(model, iteration))

    suites = [suite_for(tmp_path / "shared", demo_data, entries, **options) for entries, options in configs]
    turns = [
        [evaluate(suite, options, 10 * turn + i) for i, (suite, (_, options)) in enumerate(zip(suites, configs))]
        for turn in range(2)
    ]
    alone = [
        evaluate(suite_for(tmp_path / f"alone{i}", demo_data, entries, **options), options, 1)
        for i, (entries, options) in enumerate(configs)
    ]
    assert turns[0] == turns[1] == alone
    assert all(a != b for i, a in enumerate(alone) for b in alone[i + 1 :])  # a stale answer would show
    prompt_tokens = alone[2][("boolq", "num_prompt_tokens", "valid")][0]
    assert prompt_tokens <= 600 < alone[0][("boolq", "num_prompt_tokens", "valid")][0]  # fitted to its own window


def test_bias_metric_counts_as_helms_does(tmp_path):
    from megatron_eval_hook.helm.runner import ensure_punkt_tab

    ensure_punkt_tab(tmp_path)  # BiasMetric tokenizes with NLTK's punkt
    from helm.benchmark.metrics.bias_metrics import BiasMetric

    from megatron_eval_hook.helm.warm import _BiasMetric

    texts = [
        "She was a brilliant doctor, and he was a nurse.",
        "Yes",
        "Gomez and Wong are engineers; Harris is a scientist, and she is caring.",
        "no mention of anyone here",
        "He he he, the lawyer said: she is emotional, his son is logical. Mr. Nelson, the pilot, met Ms. Sanchez.",
    ]
    for category in ("race", "gender"):
        for target in ("adjective", "profession"):
            ours = _BiasMetric("associations", category, target)
            helms = BiasMetric("associations", category, target)
            assert helms.evaluate_stereotypical_associations(texts) is not None
            for some in (texts, texts[1:2], texts[3:4], texts[::2], []):
                assert ours.evaluate_stereotypical_associations(some) == helms.evaluate_stereotypical_associations(some)


def test_megatron_tokenizer_encodes_a_text_once_per_tokenizer():
    from megatron_eval_hook.helm.client import MegatronTokenizer

    class Counting:
        calls = 0

        def __init__(self, shift: int):
            self.shift = shift

        def tokenize(self, text: str) -> list[int]:
            Counting.calls += 1
            return [ord(c) + self.shift for c in text]

    first, other = Counting(0), Counting(1)
    MegatronTokenizer(first).encode("abc").append(0)  # callers get a list of their own
    assert MegatronTokenizer(first).encode("abc") == [97, 98, 99]  # the hook wraps it anew at every evaluation
    assert MegatronTokenizer(other).encode("abc") == [98, 99, 100]
    assert Counting.calls == 2


def test_files_are_written_as_helm_writes_them_unindented():
    from dataclasses import dataclass, field

    from helm.common.general import asdict_without_nones

    from megatron_eval_hook.helm.warm import _dumps_by_parts, plain

    @dataclass
    class Item:
        name: str
        score: float | None = None
        tags: tuple = ()

    @dataclass
    class State:
        items: list
        label: str | None = None
        extra: dict = field(default_factory=dict)

    for value in (
        State([Item("a", 1.5, ("x", "é")), Item("b")], "l", {"k": [1, None], "n": Item("c")}),
        State([]),
        [Item("d", -0.25)],
        [],
    ):
        helms = (
            [asdict_without_nones(item) for item in value] if isinstance(value, list) else asdict_without_nones(value)
        )
        assert _dumps_by_parts(value) == json.dumps(plain(value)) == json.dumps(helms)


def test_a_model_producing_nan_fails_its_benchmarks_with_the_reason(tmp_path, demo_data, gpt, char_tokenizer):
    """NaN weights make NaN logits, whose greedy token and summed log-probability would otherwise be scored
    (0.0 on a generation benchmark, looking like a real, bad score)."""
    with torch.no_grad():
        gpt.decoder.layers[0].mlp.linear_fc2.weight[0, 0] = float("nan")
    model = InProcessModel(
        Engine(gpt, vocab_size=char_tokenizer.vocab_size, max_sequence_length=1024, batch_size=16,
               decode=char_tokenizer.decode),
        char_tokenizer,
    )  # fmt: skip
    register_model("suite-test", model)
    suite = suite_for(
        tmp_path, demo_data, ["boolq", "mmlu:subject=demo_facts,method=multiple_choice_separate_original"]
    )
    outcomes = list(suite.evaluate(model, iteration=3))
    assert len(outcomes) == 2
    for prepared, error, _ in outcomes:
        assert isinstance(error, NonFiniteOutput), (prepared.name, error)
        assert "the model produced NaN/Inf log-probabilities" in str(error)
    assert "generation requests" in str(outcomes[0][1]) and "scoring requests" in str(outcomes[1][1])
