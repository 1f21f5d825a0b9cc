"""Baselines: published scores of other models, read from a YAML file, to compare runs against.

The file (`conf/baselines.yaml` documents it) lists models, each with its training tokens, the
source of its numbers, and its scores per benchmark and metric:

    baselines:
      - model: pythia-160m
        tokens: 299892736000
        source: https://...
        scores:
          mmlu: {exact_match: 0.2599}

`megatron-eval baselines` records them in the ledger (`baselines` table) and in W&B.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_eval_hook.ledger import BaselineScore

_MODEL_KEYS = {"model", "tokens", "source", "scores"}


class BaselinesError(ValueError):
    """The baselines file is wrong. The message names the value, the file and the fix."""


def load_baselines(path: str | Path) -> list[BaselineScore]:
    """Read and check the baselines file at `path`; one `BaselineScore` per model, benchmark and metric."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BaselinesError(
            f"{path}: no such file. Fix: pass --config with a baselines YAML such as conf/baselines.yaml."
        )
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise BaselinesError(
            f"{path}: not valid YAML ({error}). Fix: correct the YAML syntax at the place named."
        ) from None
    if not isinstance(document, Mapping) or not isinstance(document.get("baselines"), list):
        raise BaselinesError(
            f"{path}: the file must be a mapping with a list under `baselines`. "
            "Fix: start it with `baselines:` followed by `- model: ...` items, as conf/baselines.yaml does."
        )
    unknown = set(document) - {"baselines"}
    if unknown:
        raise BaselinesError(f"{path}: unknown top-level keys {sorted(unknown)}. Fix: keep only `baselines`.")
    scores: list[BaselineScore] = []
    seen: set[str] = set()
    for index, item in enumerate(document["baselines"]):
        model_scores = _model_scores(item, f"{path}: baselines[{index}]")
        model = model_scores[0].model
        if model in seen:
            raise BaselinesError(f"{path}: model {model!r} is listed twice. Fix: merge its scores into one item.")
        seen.add(model)
        scores += model_scores
    return scores


def _model_scores(item: Any, where: str) -> list[BaselineScore]:
    if not isinstance(item, Mapping):
        raise BaselinesError(f"{where} is {item!r}, not a mapping. Fix: write `- model: NAME` with `scores:` under it.")
    unknown = set(item) - _MODEL_KEYS
    if unknown:
        raise BaselinesError(f"{where}: unknown keys {sorted(unknown)}. Fix: use only {sorted(_MODEL_KEYS)}.")
    model = item.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BaselinesError(f"{where}.model is {model!r}. Fix: give the model's name, e.g. `model: pythia-160m`.")
    where = f"{where} (model {model!r})"
    tokens = _tokens(item.get("tokens"), where)
    source = item.get("source")
    if source is not None and not isinstance(source, str):
        raise BaselinesError(f"{where}.source is {source!r}. Fix: give the URL or paper table as a string.")
    scores = item.get("scores")
    if not isinstance(scores, Mapping) or not scores:
        raise BaselinesError(
            f"{where}.scores is {scores!r}. Fix: map each benchmark to its metrics, e.g. `mmlu: {{exact_match: 0.26}}`."
        )
    return [
        BaselineScore(
            model.strip(),
            str(benchmark),
            str(metric),
            _score(value, f"{where}.scores.{benchmark}.{metric}"),
            tokens,
            source,
        )
        for benchmark, metrics in scores.items()
        for metric, value in _metrics(metrics, f"{where}.scores.{benchmark}").items()
    ]


def _tokens(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BaselinesError(
            f"{where}.tokens is {value!r}. Fix: give the training tokens as a whole number (e.g. 299892736000), "
            "or null when unpublished."
        )
    return value


def _metrics(metrics: Any, where: str) -> Mapping[Any, Any]:
    if not isinstance(metrics, Mapping) or not metrics:
        raise BaselinesError(f"{where} is {metrics!r}. Fix: map metric names to scores, e.g. `{{exact_match: 0.26}}`.")
    return metrics


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BaselinesError(f"{where} is {value!r}, not a number. Fix: write the score as a number, e.g. 0.26.")
    if not 0.0 <= value <= 1.0:
        raise BaselinesError(
            f"{where} is {value!r}, outside [0, 1]. Fix: write scores as fractions as HELM does (27.1% is 0.271)."
        )
    return float(value)


def log_baselines_to_wandb(
    scores: list[BaselineScore], *, project: str, entity: str | None = None, directory: str | None = None
) -> str:
    """Log `scores` as a W&B Table `baselines` (and summary values) in a run `baselines`; return the run's path."""
    from megatron_eval_hook.sinks.wandb_table import log_table

    columns = ["model", "benchmark", "metric", "value", "tokens", "source"]
    rows = [[s.model, s.benchmark, s.metric, s.value, s.tokens, s.source] for s in scores]
    summary = {f"baseline/{s.model}/{s.benchmark}/{s.metric}": s.value for s in scores}
    return log_table(
        "baselines",
        columns,
        rows,
        project=project,
        entity=entity,
        directory=directory,
        name="baselines",
        job_type="baselines",
        summary=summary,
    )
