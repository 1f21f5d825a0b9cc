"""`megatron-eval check-data` and `prepare-data`, offline: HELM's own download code runs, with a fake
network under it (urllib's urlretrieve) serving the demo's data in the upstream archive formats."""

from __future__ import annotations

import filecmp
import io
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from megatron_eval_hook.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "conf" / "helm.yaml")
BENCHMARKS = "benchmarks=[default,'facts=mmlu:subject=demo_facts,method=multiple_choice_separate_original']"

# What HELM 0.5.16's scenarios download for these benchmarks, and from which of the demo's files.
MMLU = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
NARRATIVEQA = "https://github.com/deepmind/narrativeqa/archive/master.zip"
FILES = {
    "https://huggingface.co/datasets/stanford-crfm/helm-scenarios/resolve/main/boolq/train.jsonl": "boolq/data/train",
    "https://huggingface.co/datasets/stanford-crfm/helm-scenarios/resolve/main/boolq/dev.jsonl": "boolq/data/dev",
    "https://raw.githubusercontent.com/allenai/contrast-sets/main/BoolQ/boolq_perturbed.json": (
        "boolq/data/boolq_perturbed.jsonl"
    ),
    "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_train.jsonl": (
        "hellaswag/data/hellaswag_train.jsonl"
    ),
    "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl": (
        "hellaswag/data/hellaswag_val.jsonl"
    ),
}


def archive(folder: Path, top: str, kind: str) -> bytes:
    """`folder`'s files under the single top-level folder `top`, as the upstream .tar or .zip holds them."""
    buffer = io.BytesIO()
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    if kind == "tar":
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in files:
                tar.add(path, arcname=f"{top}/{path.relative_to(folder)}")
    else:
        with zipfile.ZipFile(buffer, "w") as zipped:
            for path in files:
                zipped.write(path, f"{top}/{path.relative_to(folder)}")
    return buffer.getvalue()


class FakeNetwork:
    def __init__(self, served: dict[str, bytes]):
        self.served = served  # URL -> content; any other URL fails as it does offline
        self.requested: list[str] = []


@pytest.fixture
def fake_network(demo_data, monkeypatch) -> FakeNetwork:
    """urllib.request.urlretrieve, which HELM's ensure_file_downloaded calls, serving the demo's data."""
    helm = demo_data.helm_dir
    served = {url: (helm / source).read_bytes() for url, source in FILES.items()}
    served[MMLU] = archive(helm / "mmlu" / "data", "data", "tar")
    served[NARRATIVEQA] = archive(helm / "narrativeqa" / "data" / "narrativeqa-master", "narrativeqa-master", "zip")
    network = FakeNetwork(served)

    def urlretrieve(url, filename=None, *args, **kwargs):
        network.requested.append(url)
        if url not in network.served:
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        Path(filename).write_bytes(network.served[url])
        return filename, None

    monkeypatch.setattr(urllib.request, "urlretrieve", urlretrieve)
    return network


def test_check_data_lists_what_is_missing_and_how_to_get_it(tmp_path, capsys):
    assert main(["check-data", "--config", CONFIG, "--override", BENCHMARKS, "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("MISSING") == 9  # 6 MMLU subjects, BoolQ, NarrativeQA, HellaSwag
    assert str(tmp_path / "mmlu" / "data" / "test" / "demo_facts_test.csv") in out
    assert str(tmp_path / "boolq" / "data" / "boolq_perturbed.jsonl") in out
    assert f"megatron-eval prepare-data --config {CONFIG} --override '{BENCHMARKS}' --data-dir DIR" in out


def test_prepare_data_fetches_with_helms_downloads_into_the_layout_the_hook_reads(
    demo_data, tmp_path, fake_network, capsys
):
    data_dir = tmp_path / "helm"
    assert main(["prepare-data", "--config", CONFIG, "--override", BENCHMARKS, "--data-dir", str(data_dir)]) == 0
    # each once: MMLU's one archive serves its 6 runs
    assert sorted(fake_network.requested) == sorted([MMLU, NARRATIVEQA, *FILES])

    expected = [
        "mmlu/data/test/demo_facts_test.csv", "mmlu/data/dev/econometrics_dev.csv",
        "narrativeqa/data/narrativeqa-master/qaps.csv", *FILES.values(),
    ]  # fmt: skip
    for relative in expected:
        assert filecmp.cmp(data_dir / relative, demo_data.helm_dir / relative, shallow=False), relative

    assert main(["check-data", "--config", CONFIG, "--override", BENCHMARKS, "--data-dir", str(data_dir)]) == 0
    assert "all 9 HELM runs have their data" in capsys.readouterr().out

    # ...and the hook's own startup check accepts it.
    from megatron_eval_hook.helm.benchmarks import resolve_benchmarks
    from megatron_eval_hook.helm.runner import HelmSuite

    benchmarks = resolve_benchmarks(["default", "facts=mmlu:subject=demo_facts"])
    HelmSuite(benchmarks, model_key="prepared", data_dir=data_dir, output_dir=tmp_path / "out",
              max_sequence_length=256, max_eval_instances=2)  # fmt: skip


def test_prepare_data_names_what_could_not_be_fetched(tmp_path, fake_network, capsys):
    command = ["prepare-data", "--config", CONFIG, "--data-dir", str(tmp_path)]
    assert main([*command, "--override", "benchmarks=[boolq,bolq]"]) == 2  # not a HELM run entry: nothing fetched
    assert "bolq" in capsys.readouterr().err and fake_network.requested == []

    del fake_network.served[NARRATIVEQA]  # unreachable
    assert main([*command, "--override", "benchmarks=[boolq,narrative_qa]"]) == 1
    captured = capsys.readouterr()
    assert "scenario 'narrativeqa'" in captured.err and "Name or service not known" in captured.err
    assert "MISSING  narrativeqa" in captured.out and "ok       boolq" in captured.out
