"""Every `megatron-eval` command as a user runs it: the installed console script in a subprocess, from a clean
environment (no test-session variables, no CPU shims applied beforehand), on this CPU-only machine; its
`--help` and one real invocation each, on the `hooked` run's checkpoints and ledger."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from training_runs import BENCHMARKS, FACTS

REPO = Path(__file__).resolve().parents[1]
COMMAND = Path(sys.executable).parent / "megatron-eval"
COMMANDS = [
    "results",
    "compare",
    "export-hf",
    "backfill",
    "check-data",
    "prepare-data",
    "baselines",
    "leaderboard",
    "report",
]


def clean_environment(home: Path) -> dict[str, str]:
    """What a user's shell has: a PATH, a home folder, a locale; W&B offline as it has no server here."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8", "WANDB_MODE": "offline"}


def megatron_eval(*args: str, home: Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(COMMAND), *args], cwd=cwd, env=clean_environment(home), capture_output=True, text=True, timeout=timeout
    )


def test_the_session_under_test_is_a_cpu_only_machine():
    import torch

    assert not torch.cuda.is_available()  # what the commands below must run on


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_prints_its_help(command, tmp_path):
    done = megatron_eval(*([command] if command else []), "--help", home=tmp_path, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: megatron-eval" in done.stdout


def test_every_command_runs_as_a_user_runs_it(hooked, demo_data, tmp_path):
    """One real invocation each, in the order a user would: look, export, evaluate more, compare, report."""
    run, _ = hooked
    ledger = tmp_path / "ledger.sqlite"
    shutil.copy(run / "eval" / "ledger.sqlite", ledger)  # the session's run stays as it is
    home = tmp_path / "home"
    home.mkdir()

    def succeeds(*args: str, cwd: Path = tmp_path) -> str:
        done = megatron_eval(*args, home=home, cwd=cwd)
        assert done.returncode == 0, f"megatron-eval {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    assert "boolq" in succeeds("results", "--ledger", str(ledger))
    summary = succeeds("results", "--ledger", str(ledger), "--summary")
    assert "facts" in summary and any(verdict in summary for verdict in ("within noise", "beyond noise"))
    compared = json.loads(succeeds("compare", "--ledger", str(ledger), "--run", "run", "--iteration", "7",
                                   "--vs-iteration", "3", "--format", "json"))  # fmt: skip
    assert {c["benchmark"] for c in compared} == {"boolq", "facts"}  # the broken benchmark is never ok
    assert all(c["ci_low"] <= c["difference"] <= c["ci_high"] and 0 < c["p_holm"] <= 1 for c in compared)
    succeeds("export-hf", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    config = str(REPO / "conf" / "helm.yaml")
    overrides = ["--override", f"data_dir={demo_data.helm_dir}", "--override", BENCHMARKS]
    checked = succeeds("check-data", "--config", config, *overrides)
    assert "boolq" in checked and FACTS.split("=")[0] in checked
    data = tmp_path / "data"
    shutil.copytree(demo_data.helm_dir / "boolq", data / "boolq")  # present: nothing to download
    succeeds("prepare-data", "--config", config, "--override", "benchmarks=[boolq]", "--data-dir", str(data))
    # backfill the last save again, into folders of its own (the session's run stays as it is): its tokenizer
    # files resolve from the demo's folder
    succeeds(
        "backfill", "--checkpoints", str(run / "checkpoints"), "--config", config, *overrides,
        "--override", f"output_dir={tmp_path / 'backfill'}", "--override", "max_eval_instances=2",
        "--override", "wandb.enabled=false", "--tensorboard-dir", str(tmp_path / "tensorboard"),
        "--start", "7", "--end", "7",
        cwd=demo_data.root,
    )  # fmt: skip
    assert "boolq" in succeeds("results", "--ledger", str(tmp_path / "backfill" / "ledger.sqlite"))
    succeeds("baselines", "--config", str(REPO / "conf" / "baselines.yaml"), "--ledger", str(ledger), "--no-wandb")
    assert "gpt2-124m" in succeeds("leaderboard", "--ledger", str(ledger))
    succeeds("report", "--ledger", str(ledger), "--out", str(tmp_path / "report.html"))
    assert (tmp_path / "report.html").stat().st_size > 0
