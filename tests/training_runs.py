"""Tiny pretraining runs of Megatron's real training loop (`pretrain_gpt2.py` under torchrun, CPU, gloo)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from cpu_run import CPU_ARGS, PRETRAIN_GPT2, torchrun_command

REPO = Path(__file__).resolve().parents[1]
FACTS = "facts=mmlu:subject=demo_facts,method=multiple_choice_separate_original"
TINY = (
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "128", "--max-position-embeddings", "128",
    "--micro-batch-size", "4", "--lr", "1e-3", "--seed", "7",
    "--hidden-dropout", "0.1", "--attention-dropout", "0.1",  # on: an RNG mix-up would change the loss
    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000000", "--ckpt-format", "torch_dist",
    "--tokenizer-type", "GPT2BPETokenizer", "--split", "100,0,0",
)  # fmt: skip


def train(
    tmp: Path,
    data,
    *,
    iterations: int,
    save_interval: int,
    nproc: int = 1,
    hook: list[str] | None = None,
    script: Path = PRETRAIN_GPT2,
    launcher: bool = False,
    megatron_wandb: bool = True,
    extra: Sequence[str] = (),
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """Run a tiny pretraining saving into `tmp/checkpoints`; `hook` are --eval-hook-override values (None: no
    hook); `extra` are more Megatron arguments (e.g. --load to resume)."""
    args = [
        *TINY, *CPU_ARGS, "--global-batch-size", str(4 * nproc),
        "--train-iters", str(iterations), "--save-interval", str(save_interval), "--save", str(tmp / "checkpoints"),
        "--vocab-file", str(data.vocab_file), "--merge-file", str(data.merge_file),
        "--data-path", str(data.data_prefix), "--tensorboard-dir", str(tmp / "tensorboard"), *extra,
    ]  # fmt: skip
    if megatron_wandb:
        args += ["--wandb-project", "tests", "--wandb-exp-name", "run", "--wandb-save-dir", str(tmp)]
    if hook is not None:
        args += ["--eval-hook-config", str(REPO / "conf" / "helm.yaml")]
        for override in [f"data_dir={data.helm_dir}", f"output_dir={tmp / 'eval'}", "max_eval_instances=2", *hook]:
            args += ["--eval-hook-override", override]
    head = [str(REPO / "tests" / "cpu_launch.py"), str(script)] if launcher else [str(script)]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp)}
    return subprocess.run(
        torchrun_command([*head, *args], nproc=nproc),
        cwd=data.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def data_with_a_broken_benchmark(demo_data, root: Path) -> Path:
    """The demo's HELM data plus an MMLU subject with no questions (its evaluation must fail)."""
    for scenario in ("boolq", "narrativeqa", "hellaswag"):
        (root / scenario).symlink_to(demo_data.helm_dir / scenario)
    for split in ("dev", "val", "test"):
        folder = root / "mmlu" / "data" / split
        folder.mkdir(parents=True)
        for source in (demo_data.helm_dir / "mmlu" / "data" / split).iterdir():
            (folder / source.name).symlink_to(source)
        (folder / f"empty_{split}.csv").write_text("")
    return root


# The hooked run's benchmarks: two that work and one whose evaluation fails.
HOOKED_BENCHMARKS = f"benchmarks=[boolq,'{FACTS}','broken=mmlu:subject=empty']"


def hooked_run(demo_data, tmp: Path, data_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """7 iterations saving every 3, the hook evaluating every save (3, 6 and 7, the last)."""
    hook = [HOOKED_BENCHMARKS, f"data_dir={data_dir}", "schedule.every=3"]
    return tmp, ok(train(tmp, demo_data, iterations=7, save_interval=3, hook=hook))
