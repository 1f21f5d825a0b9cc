"""HELM's `Runner` for evaluating checkpoint after checkpoint in one process.

Between two checkpoints only the model's answers change, yet HELM's `Runner.run_one` reads the
scenario's files and adapts its instances into prompts again each time, and its metrics count
the same prompts' tokens again. `ReusingRunner` runs HELM's steps for the hook's options (no dry
run, instances neither skipped nor cached on disk) but takes the adapted requests and those
tokenizations from `Reuse`, which keeps them for as long as what they were made from is unchanged.
Its metrics and output files are HELM's, computed with the pure overhead left out (see
`compute_stats` and `write_run`); the scores are the same.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path

import numpy as np
from helm.benchmark.adaptation.adapters.adapter_factory import AdapterFactory
from helm.benchmark.adaptation.request_state import RequestState
from helm.benchmark.adaptation.scenario_state import ScenarioState
from helm.benchmark.data_preprocessor import DataPreprocessor
from helm.benchmark.metrics import metric as helm_metric
from helm.benchmark.metrics import reference_metric
from helm.benchmark.metrics.bias_metrics import BiasMetric
from helm.benchmark.metrics.metric import PerInstanceStats, Stat, create_metric
from helm.benchmark.metrics.metric_service import MetricService
from helm.benchmark.model_deployment_registry import get_model_deployment
from helm.benchmark.runner import Runner, downsample_eval_instances, remove_per_instance_stats_nans, remove_stats_nans
from helm.benchmark.scenarios.scenario import (
    EVAL_SPLITS,
    Scenario,
    create_scenario,
    get_scenario_cache_path,
    with_instance_ids,
)
from helm.common.general import ensure_directory_exists, write
from helm.common.tokenization_request import TokenizationRequest, TokenizationRequestResult, TokenizationToken
from nltk.tokenize import word_tokenize

from megatron_eval_hook.helm.reference import RUNNER_OPTIONS

# A varied text whose tokens tell the run's tokenizer apart from another one.
_TOKENIZER_PROBE = (
    "Passage: The 3 quick brown foxes jumped over 12 lazy dogs in Zürich, didn't they?\n"
    "Question: Which of the following is TRUE about 'x^2 + 1'?\nA. It's always > 0\nB. $5.00 (approx.)\n"
    "Answer: B\n\n  Indented\tcode: print(foo[1:-1]) # comment; e-mail me@example.org — naïve café 東京"
)


def tokenizer_fingerprint(tokenizer) -> tuple:
    """The tokenizer's type and its tokens of a varied text: another tokenizer gives another one."""
    return type(tokenizer).__qualname__, tuple(tokenizer.encode(_TOKENIZER_PROBE))


def files_fingerprint(folder: Path) -> tuple:
    """(path, size, modification time) of every file under `folder`, links followed; HELM's lock files left out."""
    found = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            if not name.endswith(".lock"):
                stat = os.stat(os.path.join(root, name))
                found.append((os.path.join(root, name), stat.st_size, stat.st_mtime_ns))
    return tuple(found)


@dataclass(frozen=True)
class Adapted:
    """A run's scenario and its requests before any model answered them."""

    key: tuple  # what they were made from
    scenario: Scenario
    request_states: list[RequestState]


class Reuse:
    """What an evaluation takes over from the earlier ones of the same suite.

    Each run's adapted requests (instances read from the data files, picked, and turned into
    prompts): they depend on the run spec, the model deployment (its context window), the
    tokenizer (prompts are fitted into the window with it) and the scenario's data files, and are
    reused only while all four are what they were made from (`adapted`); otherwise they are made
    anew. The tokenizer and the data files are looked at again at every evaluation (`start`).

    HELM's tokenizations with the run's tokenizer (its metrics count the tokens of every prompt at
    every evaluation): kept while the tokenizer is the same, one evaluation beyond the last that
    asked for them, with one token object per distinct token (8 bytes a kept token).
    """

    def __init__(self):
        self._adapted: dict[str, Adapted] = {}  # run name -> its requests
        self._tokenizer_key: tuple | None = None
        self._data_keys: dict[str, tuple] = {}  # data folder -> fingerprint of its files, this evaluation
        self._tokenized: dict[TokenizationRequest, TokenizationRequestResult] = {}  # this evaluation
        self._tokenized_before: dict[TokenizationRequest, TokenizationRequestResult] = {}  # the one before
        self._tokens: dict[TokenizationToken, TokenizationToken] = {}

    def start(self, tokenizer) -> None:
        """Begin an evaluation whose HELM tokenizer uses `tokenizer` (a `TextTokenizer`)."""
        key = tokenizer_fingerprint(tokenizer)
        if key == self._tokenizer_key:
            self._tokenized_before = self._tokenized
        else:
            self._tokenized_before, self._tokens = {}, {}
        self._tokenized = {}
        self._tokenizer_key = key
        self._data_keys = {}

    def adapted(self, spec, runner: Runner) -> Adapted:
        """The run's requests: the kept ones if they were made from the same inputs, else new ones."""
        scenario = create_scenario(spec.scenario_spec)
        data = get_scenario_cache_path(runner.output_path, scenario.name)  # HELM reads the scenario's files here
        if data not in self._data_keys:
            self._data_keys[data] = files_fingerprint(Path(data))
        deployment = get_model_deployment(spec.adapter_spec.model_deployment)
        key = (repr(spec), repr(deployment), self._tokenizer_key, self._data_keys[data])
        kept = self._adapted.get(spec.name)
        if kept is None or kept.key != key:
            kept = self._adapted[spec.name] = Adapted(key, scenario, _read_and_adapt(runner, scenario, spec, data))
        return kept

    def tokenize(
        self, request: TokenizationRequest, tokenize: Callable[[TokenizationRequest], TokenizationRequestResult]
    ) -> TokenizationRequestResult:
        result = self._tokenized.get(request) or self._tokenized_before.get(request)
        if result is None:
            result = tokenize(request)
            if not result.success:
                return result
            result = replace(result, tokens=[self._tokens.setdefault(token, token) for token in result.tokens])
        self._tokenized[request] = result
        return result


def _read_and_adapt(runner: Runner, scenario: Scenario, spec, data: str) -> list[RequestState]:
    """HELM's `Runner.run_one` up to the requests: read the instances, pick the evaluated ones, adapt them."""
    parallelism = runner.executor.execution_spec.parallelism
    instances = scenario.get_instances(data)
    if any(instance.id is None for instance in instances):
        instances = with_instance_ids(instances)
    adapter_spec = spec.adapter_spec
    if adapter_spec.max_eval_instances is not None:
        eval_splits = adapter_spec.eval_splits or EVAL_SPLITS
        instances = downsample_eval_instances(instances, adapter_spec.max_eval_instances, eval_splits)
    instances = DataPreprocessor(spec.data_augmenter_spec).preprocess(instances, parallelism)
    return AdapterFactory.get_adapter(adapter_spec, runner.tokenizer_service).adapt(instances, parallelism)


class _ReusingMetricService(MetricService):
    def __init__(self, context, reuse: Reuse):
        super().__init__(context)
        self._reuse = reuse

    def tokenize(self, request: TokenizationRequest) -> TokenizationRequestResult:
        return self._reuse.tokenize(request, super().tokenize)


class ReusingRunner(Runner):
    """HELM's `Runner` with the hook's options, whose runs start from the requests `reuse` keeps.

    `executor` replaces HELM's own (the hook's answers all of a run's requests in batches).
    """

    def __init__(self, execution_spec, output_path: str, suite: str, *, reuse: Reuse, executor):
        super().__init__(execution_spec, output_path, suite, **RUNNER_OPTIONS)
        self.reuse = reuse
        self.executor = executor
        self.tokenizer_service = self.metric_service = _ReusingMetricService(executor.context, reuse)

    def run_one(self, run_spec) -> None:
        """`Runner.run_one`: requests, answers, annotations, metrics, HELM's five files."""
        adapted = self.reuse.adapted(run_spec, self)
        state = ScenarioState(run_spec.adapter_spec, adapted.request_states, annotator_specs=run_spec.annotators)
        state = self.annotator_executor.execute(self.executor.execute(state))
        parallelism = self.executor.execution_spec.parallelism
        stats, per_instance_stats = compute_stats(
            run_spec, state, self.metric_service, self.eval_cache_path, parallelism
        )
        write_run(self._get_run_path(run_spec), run_spec, adapted.scenario, state, stats, per_instance_stats)


def compute_stats(
    run_spec, state: ScenarioState, metric_service: MetricService, eval_cache_path: str, parallelism: int
) -> tuple[list[Stat], list[PerInstanceStats]]:
    """The run's metrics, as HELM computes them, less two kinds of pure overhead:

    - Worst cases over perturbations. For every metric, HELM adds each instance's worst value over
      its perturbations (stats named with a `perturbation`, robustness and fairness). Without
      perturbed instances (no `data_augmentation`) they are derived from the plain values alone,
      the hook never reads them (`read_stats` drops them), and they take a third of the metrics' time.
    - `BiasMetric`'s stereotypical associations count every demographic word again for each of
      several hundred target words; `_BiasMetric` counts them once per text: the same counts.
    """
    stats: list[Stat] = []
    per_instance_stats: list[PerInstanceStats] = []
    with contextlib.ExitStack() as stack:
        if all(instance.perturbation is None for instance in state.instances):
            stack.enter_context(_without_worst_cases())
        for metric_spec in run_spec.metric_specs:
            if metric_spec.class_name == f"{BiasMetric.__module__}.{BiasMetric.__qualname__}":
                metric = _BiasMetric(**metric_spec.args)
            else:
                metric = create_metric(metric_spec)
            result = metric.evaluate(state, metric_service, eval_cache_path, parallelism)
            stats.extend(result.aggregated_stats)
            per_instance_stats.extend(result.per_instance_stats)
    return stats, per_instance_stats


@contextlib.contextmanager
def _without_worst_cases():
    """HELM computes no worst cases while this lasts, in the whole process (the hook's metrics run in one thread)."""
    modules = (helm_metric, reference_metric)  # the two that compute them, each with its own import
    originals = [module.compute_worst_case_metrics for module in modules]
    for module in modules:
        module.compute_worst_case_metrics = lambda per_instance_stats: []
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.compute_worst_case_metrics = original


class _BiasMetric(BiasMetric):
    """`BiasMetric`, its stereotypical associations counting each demographic group's words once per text."""

    def evaluate_stereotypical_associations(self, texts: list[str]) -> float | None:
        groups = list(self.demographic_group_to_words)
        assert self.target_category
        target_words = self.TARGET_CATEGORY_TO_WORD_LIST[self.target_category]
        pair_to_count: dict[tuple[str, str], int] = defaultdict(int)
        for text in texts:
            tokens = word_tokenize(text.lower())
            group_counts = [sum(tokens.count(w) for w in self.demographic_group_to_words[g]) for g in groups]
            if not any(group_counts):
                continue  # every pair's count grows by 0
            for target in target_words:
                target_count = tokens.count(target)
                for group, group_count in zip(groups, group_counts):
                    pair_to_count[(target, group)] += group_count * target_count
        bias_scores = [self.group_counts_to_bias([pair_to_count[(t, g)] for g in groups]) for t in target_words]
        bias_scores = [score for score in bias_scores if score is not None]
        return np.array(bias_scores).mean() if bias_scores else None


def write_run(
    run_path: str, run_spec, scenario: Scenario, state: ScenarioState, stats: list[Stat], per_instance_stats
) -> None:
    """HELM's five files of a run, with the same content as `Runner.run_one` writes; the two large
    ones (every request and its answer, every instance's stats) without indentation, which takes
    Python's JSON encoder four times longer than the rest of their writing, and a part at a time."""
    ensure_directory_exists(run_path)
    for name, content in (
        ("run_spec.json", run_spec),
        ("scenario.json", scenario),
        ("stats.json", remove_stats_nans(stats)),
    ):
        write(os.path.join(run_path, name), json.dumps(plain(content), indent=2))
    write(os.path.join(run_path, "scenario_state.json"), _dumps_by_parts(state))
    write(
        os.path.join(run_path, "per_instance_stats.json"),
        _dumps_by_parts(remove_per_instance_stats_nans(per_instance_stats)),
    )


def _dumps_by_parts(value) -> str:
    """`json.dumps(plain(value))` for a list, or a dataclass with lists, made a field and a list item at a
    time. Making all of their dicts first kept tens of thousands alive at once, and Python's garbage
    collector then scanned the whole process (the training's objects too) every other evaluation."""
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(plain(item)) for item in value) + "]"
    parts = []
    for name in _field_names(type(value)):
        item = getattr(value, name)
        if item is not None:
            text = _dumps_by_parts(item) if isinstance(item, list) else json.dumps(plain(item))
            parts.append(f"{json.dumps(name)}: {text}")
    return "{" + ", ".join(parts) + "}"


_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}


def _field_names(kind: type) -> tuple[str, ...] | None:
    """The fields of dataclass `kind`, None for other types."""
    if kind not in _FIELD_NAMES:
        _FIELD_NAMES[kind] = tuple(field.name for field in fields(kind)) if is_dataclass(kind) else None
    return _FIELD_NAMES[kind]


def plain(value):
    """What HELM writes for `value`: `asdict_without_nones` (dataclasses as dicts without their None
    fields, throughout), made without deep-copying every leaf: three times faster, the same JSON."""
    kind = type(value)
    if kind in (str, int, float, bool) or value is None:
        return value
    names = _field_names(kind)
    if names is not None:
        return {name: plain(item) for name in names if (item := getattr(value, name)) is not None}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {plain(key): plain(item) for key, item in value.items()}
    return value
