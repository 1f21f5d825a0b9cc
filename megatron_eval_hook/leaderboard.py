"""Leaderboard: runs (at their latest or best iteration) and baselines, ranked by a composite score.

The composite follows llm-foundry's eval gauntlet: each benchmark's main score has its
random-guess level subtracted and is rescaled, `(score - chance) / (1 - chance)`, so that
guessing scores 0 and a perfect model 1 on every benchmark (below chance is negative); the
composite is the mean over the benchmarks the entry has. A benchmark an entry lacks is missing,
not zero, and every row says over how many benchmarks its composite is taken: rows compared on
fewer benchmarks than the leaderboard has are marked partial.

The random-guess level is derived from the benchmark's HELM scenario (`chance_level`): 1/4 for
MMLU and HellaSwag (four choices), 1/2 for BoolQ (yes or no), 0 for free-text generation scored
by F1, ROUGE or BLEU (NarrativeQA). A benchmark whose scenario is not known gets 0, said so in
the output, unless given with `--chance NAME=LEVEL`.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_eval_hook.helm.benchmarks import PRESETS, resolve_benchmarks
from megatron_eval_hook.ledger import BaselineScore
from megatron_eval_hook.uncertainty import Z95

PICKS = ("latest", "best")

# Answer choices per HELM scenario (`scenario` or `scenario:dataset`); None: free-text generation.
SCENARIO_CHOICES: dict[str, int | None] = {
    "mmlu": 4,
    "boolq": 2,
    "commonsense:hellaswag": 4,
    "commonsense:openbookqa": 4,
    "commonsense:piqa": 2,
    "commonsense:siqa": 3,
    "narrative_qa": None,
    "natural_qa": None,
    "quac": None,
    "summarization_cnndm": None,
    "summarization_xsum": None,
}
# Metrics that score free text: a guess scores (close to) 0 whatever the scenario.
GENERATION_METRICS = ("f1_score", "rouge_1", "rouge_2", "rouge_l", "bleu_1", "bleu_4")


class LeaderboardError(ValueError):
    """A leaderboard request is wrong. The message names the value, where it came from and the fix."""


@dataclass(frozen=True)
class Chance:
    """A benchmark's random-guess level and how it was found."""

    level: float
    reason: str


@dataclass(frozen=True)
class Entry:
    """One contender: a run at one iteration, or a baseline model."""

    name: str
    kind: str  # "run" or "baseline"
    iteration: int | None
    tokens: int | None
    scores: Mapping[str, float]  # benchmark -> its main metric
    stderrs: Mapping[str, float] = field(default_factory=dict)  # benchmark -> its standard error, where known


@dataclass(frozen=True)
class Row:
    rank: int | None  # None: no score at all
    entry: Entry
    composite: float | None
    over: tuple[str, ...]  # the benchmarks the composite is the mean of
    composite_se: float | None = None  # its standard error, when every score it is over has one


@dataclass(frozen=True)
class Leaderboard:
    benchmarks: tuple[str, ...]
    metrics: Mapping[str, str]  # benchmark -> the metric compared
    chance: Mapping[str, Chance]
    rows: tuple[Row, ...]

    def is_partial(self, row: Row) -> bool:
        """Whether `row`'s composite is over fewer benchmarks than the leaderboard has."""
        return len(row.over) < len(self.benchmarks)

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmarks": [
                {
                    "name": b,
                    "metric": self.metrics[b],
                    "chance": self.chance[b].level,
                    "chance_from": self.chance[b].reason,
                }
                for b in self.benchmarks
            ],
            "rows": [
                {
                    "rank": row.rank,
                    "name": row.entry.name,
                    "kind": row.entry.kind,
                    "iteration": row.entry.iteration,
                    "tokens": row.entry.tokens,
                    "scores": {b: row.entry.scores.get(b) for b in self.benchmarks},
                    "composite": row.composite,
                    "composite_se": row.composite_se,
                    "composite_ci": None
                    if row.composite_se is None
                    else [row.composite - Z95 * row.composite_se, row.composite + Z95 * row.composite_se],
                    "composite_over": list(row.over),
                    "partial": self.is_partial(row),
                }
                for row in self.rows
            ],
        }

    def columns(self) -> list[str]:
        return ["rank", "name", "kind", "iteration", "tokens", *self.benchmarks, "composite", "± se", "over"]

    def flat_rows(self) -> list[dict[str, Any]]:
        """One flat dict per row, keyed by `columns()`; `over` reads `n/N`, with `*` when partial."""
        return [
            {
                "rank": row.rank,
                "name": row.entry.name,
                "kind": row.entry.kind,
                "iteration": row.entry.iteration,
                "tokens": row.entry.tokens,
                **{b: row.entry.scores.get(b) for b in self.benchmarks},
                "composite": row.composite,
                "± se": row.composite_se,
                "over": f"{len(row.over)}/{len(self.benchmarks)}" + ("*" if self.is_partial(row) else ""),
            }
            for row in self.rows
        ]

    def notes(self) -> list[str]:
        """What a reader needs beside the table: the chance levels, and what `*` means."""
        levels = ", ".join(f"{b} {self.chance[b].level:g} ({self.chance[b].reason})" for b in self.benchmarks)
        lines = [
            "composite: mean over the row's benchmarks of (score - chance) / (1 - chance); missing benchmarks are "
            "left out, not counted as 0",
            f"chance levels: {levels}",
            "± se: the composite's standard error, from each score's (its 95% interval: ± 1.96 se); none for "
            "published baselines",
        ]
        if any(self.is_partial(row) for row in self.rows):
            lines.append(
                f"rows whose `over` ends in *: composite over fewer than all {len(self.benchmarks)} benchmarks, "
                "not comparable with the others as is"
            )
        return lines


def parse_chance(items: Iterable[str]) -> dict[str, float]:
    """`["facts=0.25", ...]` (from `--chance`) -> {"facts": 0.25}; raises LeaderboardError on a bad item."""
    levels: dict[str, float] = {}
    for item in items:
        name, equals, value = item.partition("=")
        try:
            level = float(value)
        except ValueError:
            level = float("nan")
        if not equals or not name.strip() or not 0.0 <= level < 1.0:
            raise LeaderboardError(
                f"--chance {item!r} is not NAME=LEVEL with 0 <= LEVEL < 1. "
                "Fix: give the benchmark's random-guess score, e.g. --chance facts=0.25 for four choices."
            )
        levels[name.strip()] = level
    return levels


def _scenario_key(run_entry: str) -> str:
    scenario, _, arguments = run_entry.partition(":")
    parameters = dict(a.split("=", 1) for a in arguments.split(",") if "=" in a)
    return f"{scenario.strip()}:{parameters['dataset']}" if "dataset" in parameters else scenario.strip()


def _preset_entries(benchmark: str) -> tuple[str, ...]:
    for candidate in resolve_benchmarks(list(PRESETS)):
        if candidate.name == benchmark:
            return candidate.run_entries
    return (benchmark,)  # a bare HELM run entry is its own benchmark name


def chance_level(benchmark: str, metric: str) -> Chance:
    """The random-guess score of `metric` on `benchmark`, from the benchmark's HELM scenario."""
    if metric in GENERATION_METRICS:
        return Chance(0.0, f"{metric} scores free text")
    keys = {_scenario_key(entry) for entry in _preset_entries(benchmark)}
    if len(keys) == 1 and (key := keys.pop()) in SCENARIO_CHOICES:
        choices = SCENARIO_CHOICES[key]
        return Chance(0.0, f"{key}: free text") if choices is None else Chance(1 / choices, f"{key}: {choices} choices")
    return Chance(0.0, "scenario unknown, taken as 0; set it with --chance")


def rescaled(score: float, chance: Chance) -> float:
    """`score` with chance subtracted and rescaled: 0 at chance, 1 at a perfect score."""
    return (score - chance.level) / (1.0 - chance.level)


def composite(scores: Mapping[str, float], chance: Mapping[str, Chance]) -> float | None:
    """The mean rescaled score over the benchmarks in `scores`; None when there are none."""
    if not scores:
        return None
    return statistics.fmean(rescaled(value, chance[b]) for b, value in scores.items())


def composite_se(
    stderrs: Mapping[str, float], scores: Mapping[str, float], chance: Mapping[str, Chance]
) -> float | None:
    """The composite's standard error: each score's, rescaled as the score is, over independent benchmarks
    (sqrt of the sum of (se / (1 - chance))^2, over the number of benchmarks); None unless every score has one."""
    if not scores or any(b not in stderrs for b in scores):
        return None
    return math.sqrt(sum((stderrs[b] / (1 - chance[b].level)) ** 2 for b in scores)) / len(scores)


def _run_stderrs(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """(run, iteration) -> benchmark -> the standard error of its main score, where the ledger has one."""
    found: dict[tuple[str, int], dict[str, float]] = {}
    for row in rows:
        if row["status"] == "ok" and row["main"] and row.get("stderr") is not None:
            found.setdefault((row["run"], row["iteration"]), {})[row["benchmark"]] = row["stderr"]
    return found


def _run_scores(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """run -> every attempted iteration -> benchmark -> main metric; a later evaluation of a save wins."""
    scores: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        at_iteration = scores.setdefault(row["run"], {}).setdefault(row["iteration"], {})
        if row["status"] == "ok" and row["main"]:
            at_iteration[row["benchmark"]] = row["value"]
    return scores


def _run_tokens(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], int]:
    return {(r["run"], r["iteration"]): r["tokens"] for r in rows if r["tokens"] is not None}


def _main_metrics(rows: Sequence[Mapping[str, Any]], baselines: Sequence[BaselineScore]) -> dict[str, str]:
    """benchmark -> the metric compared: the runs' main metric, else the baselines' most common one."""
    metrics = {r["benchmark"]: r["metric"] for r in rows if r["status"] == "ok" and r["main"]}
    counts = Counter((b.benchmark, b.metric) for b in baselines if b.benchmark not in metrics)
    for (benchmark, metric), _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        metrics.setdefault(benchmark, metric)
    return metrics


def _baseline_entries(baselines: Sequence[BaselineScore], metrics: Mapping[str, str]) -> list[Entry]:
    models: dict[str, list[BaselineScore]] = {}
    for score in baselines:
        models.setdefault(score.model, []).append(score)
    return [
        Entry(
            model,
            "baseline",
            None,
            scores[0].tokens,
            {s.benchmark: s.value for s in scores if metrics.get(s.benchmark) == s.metric},
        )
        for model, scores in models.items()
    ]


def _pick_iteration(iterations: Mapping[int, Mapping[str, float]], pick: str, chance: Mapping[str, Chance]) -> int:
    scored = [i for i, scores in iterations.items() if scores]
    if not scored:
        return max(iterations)
    if pick == "latest":
        return max(scored)
    # best: among the iterations with the most benchmarks, the highest composite (the latest on a tie)
    return max(scored, key=lambda i: (len(iterations[i]), composite(iterations[i], chance), i))


def _check_runs(wanted: Sequence[str], known: Iterable[str], source: str) -> None:
    known = sorted(known)
    for name in wanted:
        if name not in known:
            raise LeaderboardError(
                f"--runs {name!r}: no run of that name in {source}. Fix: use one of {known}"
                + (" (the ledger has no evaluations yet)." if not known else ".")
            )


def build_leaderboard(
    rows: Sequence[Mapping[str, Any]],
    baselines: Sequence[BaselineScore] = (),
    *,
    runs: Sequence[str] | None = None,
    pick: str = "latest",
    chance: Mapping[str, float] | None = None,
    source: str = "the ledger",
) -> Leaderboard:
    """Rank the runs of `rows` (`Ledger.results()`) at their `pick` iteration, and `baselines`.

    `runs` keeps only those runs (LeaderboardError for one not in `rows`, naming `source`);
    `chance` overrides random-guess levels per benchmark.
    """
    if pick not in PICKS:
        raise LeaderboardError(f"--pick {pick!r} is not one of {list(PICKS)}. Fix: use --pick latest or --pick best.")
    run_scores = _run_scores(rows)
    if runs:
        _check_runs(runs, run_scores, source)
        run_scores = {name: run_scores[name] for name in runs}
        rows = [r for r in rows if r["run"] in run_scores]
    metrics = _main_metrics(rows, baselines)
    levels = {
        b: Chance(chance[b], "given with --chance") if b in (chance or {}) else chance_level(b, m)
        for b, m in metrics.items()
    }
    tokens = _run_tokens(rows)
    stderrs = _run_stderrs(rows)
    entries = []
    for name, iterations in run_scores.items():
        iteration = _pick_iteration(iterations, pick, levels)
        entries.append(Entry(name, "run", iteration, tokens.get((name, iteration)), iterations.get(iteration, {}),
                             stderrs.get((name, iteration), {})))  # fmt: skip
    entries += _baseline_entries(baselines, metrics)
    return Leaderboard(tuple(metrics), metrics, levels, _ranked(entries, levels))


def _ranked(entries: Sequence[Entry], chance: Mapping[str, Chance]) -> tuple[Row, ...]:
    scored = [(entry, composite(entry.scores, chance)) for entry in entries]
    scored.sort(key=lambda pair: (pair[1] is None, -(pair[1] or 0.0), pair[0].kind, pair[0].name))
    return tuple(
        Row(
            rank if value is not None else None,
            entry,
            value,
            tuple(entry.scores),
            composite_se(entry.stderrs, entry.scores, chance),
        )  # fmt: skip
        for rank, (entry, value) in enumerate(scored, start=1)
    )


def format_count(tokens: int | None) -> str:
    """12_300_000_000 -> '12.3B'."""
    if tokens is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if tokens >= size:
            return f"{tokens / size:.1f}{unit}"
    return str(tokens)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "tokens":
        return format_count(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def display_rows(leaderboard: Leaderboard) -> list[list[str]]:
    """The table's cells as text, in `columns()` order."""
    columns = leaderboard.columns()
    return [[_cell(c, row[c]) for c in columns] for row in leaderboard.flat_rows()]


def to_text(leaderboard: Leaderboard) -> str:
    """A plain-text table with aligned columns, then the notes."""
    columns = leaderboard.columns()
    cells = display_rows(leaderboard)
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines + [""] + leaderboard.notes())


def to_markdown(leaderboard: Leaderboard) -> str:
    """A Markdown table, then the notes."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    columns = leaderboard.columns()
    lines = [line(columns), line(["---"] * len(columns))] + [line(r) for r in display_rows(leaderboard)]
    return "\n".join(lines + [""] + [f"- {note}" for note in leaderboard.notes()])


def to_csv(leaderboard: Leaderboard) -> str:
    """CSV with raw values (tokens as integers, empty cells for missing scores)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=leaderboard.columns(), lineterminator="\n")
    writer.writeheader()
    writer.writerows(leaderboard.flat_rows())
    return buffer.getvalue()


def log_leaderboard_to_wandb(
    leaderboard: Leaderboard, *, project: str, entity: str | None = None, directory: str | None = None
) -> str:
    """Log the leaderboard as the W&B Table `leaderboard` in a run `leaderboard`; return the run's folder."""
    from megatron_eval_hook.sinks.wandb_table import log_table

    columns = leaderboard.columns()
    rows = [[row[c] for c in columns] for row in leaderboard.flat_rows()]
    return log_table(
        "leaderboard",
        columns,
        rows,
        project=project,
        entity=entity,
        directory=directory,
        name="leaderboard",
        job_type="leaderboard",
    )
