"""Benchmarks: named groups of HELM run entries, and the presets users pick them from.

A config's `benchmarks` list holds preset names, HELM run entries (`boolq`,
`mmlu:subject=anatomy`), or named run entries (`facts=mmlu:subject=my_facts`). Entries that
share a name form one benchmark whose score is the mean of its entries' scores (the default
preset's MMLU is five subjects).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# HELM Lite's MMLU subjects (helm/benchmark/presentation/run_entries_lite*.conf in crfm-helm).
LITE_MMLU_SUBJECTS = (
    "abstract_algebra",
    "college_chemistry",
    "computer_security",
    "econometrics",
    "us_foreign_policy",
)

# The original Data-Juicer evaluator's demo set: a subset of MMLU, BoolQ, NarrativeQA, HellaSwag.
PRESETS: dict[str, tuple[str, ...]] = {
    "default": (
        *(f"mmlu=mmlu:subject={s},method=multiple_choice_joint" for s in LITE_MMLU_SUBJECTS),
        "boolq",
        "narrative_qa",
        "hellaswag=commonsense:dataset=hellaswag,method=multiple_choice_separate_original",
    ),
}


@dataclass(frozen=True)
class Benchmark:
    """One score per metric: the mean over its HELM run entries (written without `model=`)."""

    name: str
    run_entries: tuple[str, ...]


def split_named_entry(item: str) -> tuple[str, str]:
    """`name=entry` -> (name, entry); a bare run entry is its own name."""
    equals, colon = item.find("="), item.find(":")
    if equals > 0 and (colon < 0 or equals < colon):
        return item[:equals].strip(), item[equals + 1 :].strip()
    return item.strip(), item.strip()


def resolve_benchmarks(items: Sequence[str], presets: Mapping[str, Sequence[str]] | None = None) -> list[Benchmark]:
    """Expand presets (the config's own first, then the built-in ones) into benchmarks, in order.

    Raises ValueError for an entry that names a model (the hook sets it) or a preset that
    includes itself.
    """
    known = {**PRESETS, **{name: tuple(entries) for name, entries in (presets or {}).items()}}
    grouped: dict[str, list[str]] = {}

    def add(item: str, seen: tuple[str, ...]) -> None:
        if item in known:
            if item in seen:
                raise ValueError(f"preset {item!r} includes itself (through {' -> '.join(seen)})")
            for inner in known[item]:
                add(inner, (*seen, item))
            return
        name, entry = split_named_entry(item)
        if not name or not entry:
            raise ValueError(f"benchmark {item!r} is empty on one side of '='")
        if "model=" in entry:
            raise ValueError(f"run entry {entry!r} names a model; leave it out, the hook evaluates the training model")
        entries = grouped.setdefault(name, [])
        if entry not in entries:
            entries.append(entry)

    for item in items:
        add(item, ())
    return [Benchmark(name, tuple(entries)) for name, entries in grouped.items()]
