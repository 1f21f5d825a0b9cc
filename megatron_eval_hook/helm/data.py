"""The offline benchmark data: what each HELM run reads from data_dir, and fetching it with HELM itself.

`data_dir` holds each scenario's files in HELM's own layout, `<data_dir>/<scenario>/...`, which is
what HELM downloads into `benchmark_output/scenarios/<scenario>/...`. HELM downloads any file that
is missing when a run starts, which fails on an air-gapped cluster, so the hook checks the files
before training starts (`missing`), and `fetch` downloads them on a machine with internet through
the scenario's own `get_instances`, exactly as `helm-run` would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Files each scenario reads from its data folder (relative to <data_dir>/<scenario>). A scenario
# not listed here is checked for its folder only.
REQUIRED_FILES: dict[str, Callable[[dict], list[str]]] = {
    "mmlu": lambda args: [f"data/dev/{args['subject']}_dev.csv", f"data/test/{args['subject']}_test.csv"],
    "boolq": lambda args: ["data/train", "data/dev", "data/boolq_perturbed.jsonl"],
    "narrativeqa": lambda args: [
        "data/narrativeqa-master/qaps.csv",
        "data/narrativeqa-master/third_party/wikipedia/summaries.csv",
    ],
    "hellaswag": lambda args: ["data/hellaswag_train.jsonl", "data/hellaswag_val.jsonl"],
}


@dataclass(frozen=True)
class ScenarioData:
    """The data one HELM run reads: its scenario's folder under data_dir, and the files in it."""

    where: str  # the benchmark and run entry it serves, for messages
    scenario: str  # HELM's scenario name, the folder's name
    scenario_spec: Any  # helm ScenarioSpec: which scenario class, with which arguments
    files: tuple[str, ...]  # relative to <data_dir>/<scenario>; "" is the folder itself

    @classmethod
    def of(cls, where: str, scenario: str, scenario_spec: Any) -> ScenarioData:
        files = REQUIRED_FILES.get(scenario, lambda _: [""])(scenario_spec.args)
        return cls(where, scenario, scenario_spec, tuple(files))

    def missing(self, data_dir: str | Path) -> list[Path]:
        folder = Path(data_dir) / self.scenario
        return [folder / name for name in self.files if not (folder / name).exists()]


def fetch(items: Iterable[ScenarioData], data_dir: str | Path, report: Callable[[str], None] = print) -> list[str]:
    """Download the data of every scenario of `items` into `<data_dir>/<scenario>` with HELM's own code
    (`Scenario.get_instances`, which also parses what it downloaded); files already there are kept.

    Returns the problems, one line per scenario that could not be fetched."""
    from helm.benchmark.scenarios.scenario import create_scenario

    data_dir = Path(data_dir)
    problems = []
    done: set[str] = set()
    for item in items:
        key = repr(item.scenario_spec)
        if key in done:
            continue
        done.add(key)
        folder = data_dir / item.scenario
        report(f"{item.scenario}: fetching for {item.where} into {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            instances = create_scenario(item.scenario_spec).get_instances(str(folder))
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            problems.append(f"{item.where}: HELM could not fetch scenario {item.scenario!r}: {reason}")
            report(f"{item.scenario}: FAILED: {reason}")
            continue
        report(f"{item.scenario}: {len(instances)} instances")
    return problems


def report(items: list[ScenarioData], data_dir: str | Path, how_to_fetch: str) -> tuple[str, bool]:
    """A readable account of which runs' data is present in `data_dir`; and whether all of it is.

    `how_to_fetch`: the command that fetches what is missing, for the message."""
    lines = []
    missing_count = 0
    for item in items:
        missing = item.missing(data_dir)
        if missing:
            missing_count += 1
            lines.append(f"MISSING  {item.scenario:<12} {item.where}: {', '.join(map(str, missing))}")
        else:
            lines.append(f"ok       {item.scenario:<12} {item.where}")
    if missing_count:
        lines.append(
            f"\n{missing_count} of {len(items)} HELM runs lack data in {Path(data_dir).resolve()}. To get it, on a "
            f"machine with internet run\n  {how_to_fetch}\nand copy DIR's contents into that folder (HELM's layout: "
            "<data_dir>/<scenario>/...)."
        )
    else:
        lines.append(f"\nall {len(items)} HELM runs have their data in {Path(data_dir).resolve()}")
    return "\n".join(lines), missing_count == 0
