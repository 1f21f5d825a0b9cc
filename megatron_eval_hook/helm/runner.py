"""Run HELM benchmarks in-process on the live model and read their scores.

`HelmSuite` does the slow and fallible work once, when the hook is installed: it registers the
in-process model deployment, turns run entries into RunSpecs, finds each benchmark's main
metric, and checks and stages the offline data. `HelmSuite.evaluate` then runs every benchmark
for one checkpoint and yields its metrics (or its error) benchmark by benchmark.

Output layout (HELM's own): `<output_dir>/helm/runs/iter_XXXXXXX/<run>/stats.json`, with
`<output_dir>/helm/scenarios/<scenario>` linked to `<data_dir>/<scenario>`.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import time
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

from megatron_eval_hook.helm.benchmarks import Benchmark
from megatron_eval_hook.helm.choices import early_signal, read_choices
from megatron_eval_hook.helm.data import ScenarioData
from megatron_eval_hook.helm.offline import NetworkBlocked, network_blocked
from megatron_eval_hook.ledger import MetricValue

MODEL_ORG = "megatron_eval_hook"


class BenchmarkError(RuntimeError):
    """A benchmark could not be evaluated; the message says why and what to do."""


@dataclass(frozen=True)
class PreparedBenchmark:
    benchmark: Benchmark
    run_specs: tuple  # of helm RunSpec, one per run entry
    main_metric: str
    main_split: str

    @property
    def name(self) -> str:
        return self.benchmark.name


def ensure_punkt_tab(folder: Path) -> None:
    """Make NLTK find a `punkt_tab` without downloading one (BoolQ's bias and NarrativeQA's BLEU
    metrics tokenize with it). An existing installation wins; otherwise an empty English model
    is written to `folder`: sentence splitting without the abbreviation list, which changes
    nothing for single-sentence answers."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass
    english = folder / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (english / name).touch()
    nltk.data.path.insert(0, str(folder))
    os.environ["NLTK_DATA"] = os.pathsep.join(filter(None, [str(folder), os.environ.get("NLTK_DATA")]))


def register_deployment(key: str, max_sequence_length: int) -> str:
    """Register the in-process model `key` with HELM; return the deployment name for run entries.

    Registering it with another context window replaces the deployment's window: HELM's registry
    is global, so a suite registers its own again at every evaluation."""
    from helm.benchmark.model_deployment_registry import (
        DEPLOYMENT_NAME_TO_MODEL_DEPLOYMENT,
        ClientSpec,
        ModelDeployment,
        register_model_deployment,
    )
    from helm.benchmark.model_metadata_registry import (
        FULL_FUNCTIONALITY_TEXT_MODEL_TAG,
        TEXT_MODEL_TAG,
        ModelMetadata,
        register_model_metadata,
    )
    from helm.benchmark.tokenizer_config_registry import TokenizerConfig, TokenizerSpec, register_tokenizer_config

    name = f"{MODEL_ORG}/{key}"
    if name in DEPLOYMENT_NAME_TO_MODEL_DEPLOYMENT:
        registered = DEPLOYMENT_NAME_TO_MODEL_DEPLOYMENT[name]
        if registered.max_sequence_length != max_sequence_length:
            register_model_deployment(replace(registered, max_sequence_length=max_sequence_length))
        return name
    register_model_metadata(
        ModelMetadata(
            name=name,
            creator_organization_name=MODEL_ORG,
            display_name=key,
            description="The Megatron model being trained, evaluated in-process.",
            access="open",
            release_date=date.today(),
            tags=[TEXT_MODEL_TAG, FULL_FUNCTIONALITY_TEXT_MODEL_TAG],
        )
    )
    register_tokenizer_config(
        TokenizerConfig(
            name=f"{name}-tokenizer",
            tokenizer_spec=TokenizerSpec(
                class_name="megatron_eval_hook.helm.client.InProcessTokenizer", args={"backend": key}
            ),
        )
    )
    register_model_deployment(
        ModelDeployment(
            name=name,
            model_name=name,
            tokenizer_name=f"{name}-tokenizer",
            max_sequence_length=max_sequence_length,
            client_spec=ClientSpec(class_name="megatron_eval_hook.helm.client.InProcessClient", args={"backend": key}),
        )
    )
    return name


def read_stats(path: Path) -> dict[tuple[str, str], MetricValue]:
    """HELM's aggregated stats of one run, without the perturbation copies, by (metric, split).

    A metric's `count` is the number of instances of its split (HELM's own `count` is the
    number of trials its mean is taken over)."""
    entries = [s for s in json.loads(path.read_text()) if "perturbation" not in s["name"] and "mean" in s]
    instances = {s["name"].get("split", ""): int(s["mean"]) for s in entries if s["name"]["name"] == "num_instances"}
    stats = {}
    for stat in entries:
        key = (stat["name"]["name"], stat["name"].get("split", ""))
        stats[key] = MetricValue(key[0], key[1], float(stat["mean"]), instances.get(key[1], 0))
    return stats


# (instance id, the main metric's value, the gold answer's log-prob, the best wrong answer's log-prob)
InstanceValue = tuple[str, float, float | None, float | None]


def read_instance_values(path: Path, metric: str, split: str) -> list[tuple[str, float]]:
    """HELM's per-instance values of `metric` on `split` in one run (`per_instance_stats.json`), without the
    perturbation copies: (instance id, value), the mean over train trials, in HELM's order."""
    sums: dict[str, list[float]] = {}
    for entry in json.loads(path.read_text()):
        if entry.get("perturbation"):
            continue
        for stat in entry["stats"]:
            name = stat["name"]
            if name["name"] == metric and name.get("split", "") == split and "perturbation" not in name:
                if stat.get("count"):
                    sums.setdefault(entry["instance_id"], []).append(float(stat["mean"]))
    return [(instance, sum(values) / len(values)) for instance, values in sums.items()]


def _mean_over_runs(per_run: list[dict[tuple[str, str], MetricValue]]) -> list[MetricValue]:
    keys = dict.fromkeys(k for stats in per_run for k in stats)
    merged = []
    for metric, split in keys:
        values = [stats[(metric, split)] for stats in per_run if (metric, split) in stats]
        mean = sum(v.value for v in values) / len(values)
        merged.append(MetricValue(metric, split, mean, sum(v.count for v in values)))
    return merged


# (benchmark, its metrics or the error that stopped it, seconds taken)
BenchmarkOutcome = tuple[PreparedBenchmark, list[MetricValue] | Exception, float]


class HelmSuite:
    """The configured benchmarks, ready to evaluate any checkpoint of the model `model_key`."""

    def __init__(
        self,
        benchmarks: list[Benchmark],
        *,
        model_key: str,
        data_dir: str | Path,
        output_dir: str | Path,
        max_sequence_length: int,
        max_eval_instances: int,
        num_train_trials: int = 1,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.helm_dir = Path(output_dir).resolve() / "helm"
        self.model_key = model_key
        self.max_sequence_length = max_sequence_length
        self.helm_dir.mkdir(parents=True, exist_ok=True)
        # HELM logs every step at INFO, and Megatron sets the root logger to INFO: keep the
        # training log readable (HELM's own outputs stay on disk).
        logging.getLogger("helm").setLevel(logging.WARNING)
        logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score: three lines per generation request
        # NLTK's BLEU warns, five lines each time, about every answer that shares no 2-, 3- or 4-gram with its
        # reference (most of a small model's): the score is 0 as HELM means it; nothing for the user to act on
        warnings.filterwarnings("ignore", category=UserWarning, module=r"nltk\.translate\.bleu_score")
        ensure_punkt_tab(self.helm_dir / "nltk_data")
        from megatron_eval_hook.helm.warm import Reuse

        # The per-instance values of the main metric of each benchmark of the latest `evaluate`, one list per HELM
        # run averaged into it: (instance id, value, gold answer's log-prob, best wrong answer's log-prob; both
        # None but for separate multiple-choice methods). What uncertainty and paired comparisons come from.
        self.instances: dict[str, list[list[InstanceValue]]] = {}
        deployment = register_deployment(model_key, max_sequence_length)
        self._stage_data()
        self.benchmarks = [self._prepare(b, deployment, max_eval_instances, num_train_trials) for b in benchmarks]
        self._reuse = Reuse()  # what evaluations can take over from earlier ones

    def _prepare(
        self, benchmark: Benchmark, deployment: str, max_eval_instances: int, num_train_trials: int
    ) -> PreparedBenchmark:
        from helm.benchmark.scenarios.scenario import create_scenario

        specs = []
        metadata = None
        for where, spec in run_specs(benchmark, deployment, max_eval_instances, num_train_trials):
            scenario = create_scenario(spec.scenario_spec)
            missing = ScenarioData.of(where, scenario.name, spec.scenario_spec).missing(self.data_dir)
            if missing:
                raise BenchmarkError(
                    f"{where} needs HELM data of scenario {scenario.name!r} that is missing from data_dir "
                    f"{self.data_dir}: {', '.join(map(str, missing))}. Fix: put the scenario's files there in HELM's "
                    f"layout (<data_dir>/{scenario.name}/... as in HELM's benchmark_output/scenarios/; "
                    "`megatron-eval prepare-data` fetches them), or set data_dir."
                )
            try:
                metadata = metadata or scenario.get_metadata()
            except NotImplementedError as error:
                raise BenchmarkError(
                    f"{where}: HELM scenario {scenario.name!r} declares no main metric, so the hook cannot "
                    "tell which score to report. Fix: use a scenario with metadata."
                ) from error
            self._dry_run(where, scenario, spec)
            specs.append(replace(spec, name=spec.name.replace("/", "_")))
        return PreparedBenchmark(benchmark, tuple(specs), metadata.main_metric, metadata.main_split)

    def _dry_run(self, where: str, scenario: Any, spec: Any) -> None:
        """Load the run's instances and apply its data augmentation as HELM's runner does, with the network
        blocked: a benchmark whose data is incomplete (it would download, or a file cannot be read) is refused
        here, before any evaluation, rather than failing at every save."""
        from helm.benchmark.data_preprocessor import DataPreprocessor
        from helm.benchmark.runner import downsample_eval_instances, set_benchmark_output_path
        from helm.benchmark.scenarios.scenario import EVAL_SPLITS, get_scenario_cache_path, with_instance_ids

        set_benchmark_output_path(str(self.helm_dir))
        try:
            with network_blocked():
                instances = with_instance_ids(
                    scenario.get_instances(get_scenario_cache_path(str(self.helm_dir), scenario.name))
                )
                if spec.adapter_spec.max_eval_instances is not None:
                    splits = spec.adapter_spec.eval_splits or EVAL_SPLITS
                    instances = downsample_eval_instances(instances, spec.adapter_spec.max_eval_instances, splits)
                DataPreprocessor(spec.data_augmenter_spec).preprocess(instances, 1)
        except NetworkBlocked as error:
            augmented = bool(spec.data_augmenter_spec.perturbation_specs)
            raise BenchmarkError(
                f"{where}: HELM cannot run it offline: {error}, and the hook allows no download during training. "
                f"Fix: put the files of scenario {scenario.name!r} in data_dir {self.data_dir} in HELM's layout "
                f"(`megatron-eval prepare-data` fetches those it knows)"
                + (
                    ", and drop the run entry's data_augmentation (its perturbations download their own files)"
                    if augmented
                    else ""
                )
                + "; or leave this benchmark out."
            ) from error
        except Exception as error:
            raise BenchmarkError(
                f"{where}: HELM cannot read the data of scenario {scenario.name!r} in data_dir {self.data_dir}: "
                f"{type(error).__name__}: {error}. Fix: check that its files are complete and in HELM's layout."
            ) from error

    def _stage_data(self) -> None:
        scenarios = self.helm_dir / "scenarios"
        scenarios.mkdir(exist_ok=True)
        for source in self.data_dir.iterdir():
            link = scenarios / source.name
            if link.is_symlink() and link.resolve() != source.resolve():
                link.unlink()
            if not link.exists():
                link.symlink_to(source, target_is_directory=True)

    def evaluate(self, model, iteration: int, only: Collection[str] | None = None) -> Iterator[BenchmarkOutcome]:
        """For each benchmark (or each named in `only`): (benchmark, its metrics or the error, seconds taken)
        at `iteration`."""
        from helm.benchmark.runner import set_benchmark_output_path

        from megatron_eval_hook.helm.client import registered_model

        set_benchmark_output_path(str(self.helm_dir))
        register_deployment(self.model_key, self.max_sequence_length)
        self._reuse.start(registered_model(self.model_key).tokenizer)
        runner = _batching_runner(model, self.helm_dir, suite=f"iter_{iteration:07d}", reuse=self._reuse)
        self.instances = {}
        for prepared in self.benchmarks:
            if only is not None and prepared.name not in only:
                continue
            started = time.perf_counter()
            try:
                per_run, instances = [], []
                for spec in prepared.run_specs:
                    stats = self._run(runner, spec, prepared)
                    values, signal = self._instance_values(runner, spec, prepared)
                    per_run.append({**stats, **signal})
                    instances.append(values)
                self.instances[prepared.name] = instances
                yield prepared, _mean_over_runs(per_run), time.perf_counter() - started
            except Exception as error:  # one benchmark failing must not stop the others
                yield prepared, error, time.perf_counter() - started

    @staticmethod
    def _instance_values(
        runner, spec, prepared: PreparedBenchmark
    ) -> tuple[list[InstanceValue], dict[tuple[str, str], MetricValue]]:
        """The run's per-instance values of the main metric, with its answers' log-probabilities where HELM
        scored each answer, and the run's early-signal scores (`choices.py`) over the same instances."""
        folder = Path(runner.runs_path) / spec.name
        values = read_instance_values(folder / "per_instance_stats.json", prepared.main_metric, prepared.main_split)
        choices = read_choices(folder / "scenario_state.json")
        scored = [choices[instance] for instance, _ in values if instance in choices]
        split, signal = prepared.main_split, {}
        if scored and len(scored) == len(values):
            signal = {(m, split): MetricValue(m, split, v, len(scored)) for m, v in early_signal(scored).items()}
        return [
            (instance, value, *(
                (choices[instance].gold_logprob, choices[instance].best_wrong_logprob)
                if instance in choices else (None, None)
            ))
            for instance, value in values
        ], signal  # fmt: skip

    def _run(self, runner, spec, prepared: PreparedBenchmark) -> dict[tuple[str, str], MetricValue]:
        runner.run_one(spec)
        path = Path(runner.runs_path) / spec.name / "stats.json"
        stats = read_stats(path)
        main = stats.get((prepared.main_metric, prepared.main_split))
        if main is None or main.count == 0:
            raise BenchmarkError(
                f"HELM run {spec.name} produced no {prepared.main_metric} on the {prepared.main_split} split "
                f"(zero instances?) in {path}. Fix: check that data_dir holds {prepared.main_split} instances "
                "for this scenario."
            )
        return stats


def run_specs(
    benchmark: Benchmark, deployment: str, max_eval_instances: int, num_train_trials: int = 1
) -> Iterator[tuple[str, object]]:
    """The HELM RunSpecs of `benchmark`'s run entries for the model `deployment`, each with a
    description of where it came from; BenchmarkError for an entry HELM does not know."""
    from helm.benchmark.presentation.run_entry import RunEntry
    from helm.benchmark.run import run_entries_to_run_specs

    for entry in benchmark.run_entries:
        where = f"benchmark {benchmark.name!r} (run entry {entry!r})"
        try:
            separator = "," if ":" in entry else ":"
            found = run_entries_to_run_specs(
                [RunEntry(description=f"{entry}{separator}model={deployment}", priority=1, groups=None)],
                max_eval_instances=max_eval_instances,
                num_train_trials=num_train_trials,
            )
        except Exception as error:
            raise BenchmarkError(f"{where} is not a HELM run entry: {error}. Fix: {_suggest(entry)}") from error
        for spec in found:
            yield where, spec


def benchmark_data(benchmarks: list[Benchmark]) -> list[ScenarioData]:
    """What the run entries of `benchmarks` read from data_dir, one item per HELM run."""
    from helm.benchmark.scenarios.scenario import create_scenario

    deployment = register_deployment("data_check", 2048)  # run specs name a model; any registered one does
    items = []
    for benchmark in benchmarks:
        for where, spec in run_specs(benchmark, deployment, max_eval_instances=1):
            scenario = create_scenario(spec.scenario_spec)
            items.append(ScenarioData.of(where, scenario.name, spec.scenario_spec))
    return items


def _batching_runner(model, helm_dir: Path, suite: str, reuse):
    from helm.benchmark.executor import ExecutionSpec, Executor
    from helm.common.authentication import Authentication

    from megatron_eval_hook.helm.warm import ReusingRunner

    class BatchingExecutor(Executor):
        """Answers all requests of a run in batches before HELM asks for them one by one."""

        def execute(self, scenario_state):
            model.prefetch(scenario_state.request_states, scenario_state.adapter_spec.method)
            try:
                return super().execute(scenario_state)
            finally:
                model.forget()

    spec = ExecutionSpec(url=None, auth=Authentication(""), local_path=str(helm_dir / "prod_env"), parallelism=1)
    return ReusingRunner(spec, str(helm_dir), suite, reuse=reuse, executor=BatchingExecutor(spec))


def _suggest(entry: str) -> str:
    from helm.benchmark.run_spec import _REGISTERED_RUN_SPEC_FUNCTIONS, discover_run_spec_functions

    discover_run_spec_functions()
    name = entry.split(":", 1)[0]
    close = difflib.get_close_matches(name, list(_REGISTERED_RUN_SPEC_FUNCTIONS), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return f"use a HELM run-spec name such as boolq, mmlu:subject=anatomy or narrative_qa.{hint}"
