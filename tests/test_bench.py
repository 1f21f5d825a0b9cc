"""The benchmarks: bench/throughput.py's accounting and data conversion (it is run by hand), and bench/stall.py
run end to end (its figure is not checked here)."""

from __future__ import annotations

import bz2
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_useful_work_counts_each_distinct_position_once(bench):
    shape = bench.Shape(layers=1, hidden=2, vocab=10, non_embedding_params=100)
    work = bench.UsefulWork(shape)  # a position attending to d tokens: 200 + 8d FLOPs; output layer: 40
    work.add([1, 2, 3], outputs_from=1)
    assert (work.positions, work.outputs, work.flops) == (3, 2, 208 + 216 + 224 + 2 * 40)
    work.add([1, 2, 4], outputs_from=2)  # shares the first two positions, and the output at position 1
    work.add([1, 2, 3], outputs_from=0)  # only the output at position 0 is new
    assert (work.positions, work.outputs) == (4, 4)
    assert work.flops == 208 + 216 + 224 + 224 + 4 * 40


def test_the_lm_eval_request_rebuilds_helm_s_separate_prompt(bench):
    assert bench.split_reference("Cloak color of Vandor red", "red") == ("Cloak color of Vandor", " red")
    with pytest.raises(ValueError, match="does not end with"):
        bench.split_reference("Cloak color of Vandor red", "blue")


def test_a_relative_data_dir_is_made_absolute(bench, tmp_path, monkeypatch):
    # the HELM data folder it builds elsewhere links to MMLU there: a relative link would dangle
    monkeypatch.chdir(tmp_path)
    assert bench.parse_args(["--data-dir", "data"]).data_dir == tmp_path / "data"


def test_hellaswag_text_export_becomes_helm_rows(bench, tmp_path):
    tasks = [
        ("Roof shingle removal: A man is sitting on a roof. he", 3, ["a.", "b.", "c.", "starts pulling."]),
        ("Baking: Mix the flour", 0, ["well.", "x.", "y.", "z."]),
    ] * 11
    text = "\n".join(f"{context}\n{label}\n" + "\n".join(endings) for context, label, endings in tasks) + "\n"
    source = tmp_path / "hellaswag_val_full.txt.bz2"
    source.write_bytes(bz2.compress(text.encode()))
    bench.convert_hellaswag(source, tmp_path / "helm")
    val = [json.loads(line) for line in (tmp_path / "helm/hellaswag/data/hellaswag_val.jsonl").open()]
    assert (
        len(val) == 2 and len((tmp_path / "helm/hellaswag/data/hellaswag_train.jsonl").read_text().splitlines()) == 20
    )
    first = val[0]
    assert (first["activity_label"], first["ctx_a"], first["ctx_b"]) == (
        "Roof shingle removal",
        "A man is sitting on a roof.",
        "he",
    )
    assert first["endings"][first["label"]] == "starts pulling."
    assert (val[1]["ctx_a"], val[1]["ctx_b"]) == ("Mix the flour", "")


@pytest.mark.slow
def test_the_stall_benchmark_runs_the_async_hook_and_prints_its_ratio():
    import subprocess

    script = BENCH.parent / "stall.py"
    result = subprocess.run([sys.executable, str(script), "--rounds", "2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "model: 124.5M parameters" in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT stall_ratio=") and float(last.partition("=")[2]) > 0
