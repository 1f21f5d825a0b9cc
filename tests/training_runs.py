"""Tiny pretraining runs of Megatron's real training loop (`pretrain_gpt2.py` under torchrun, CPU, gloo)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from cpu_run import CPU_ARGS, PRETRAIN_GPT2, torchrun_command

from megatron_eval_hook.ledger import Ledger

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

# TINY made Llama-style: rotary positions, RMSNorm, SwiGLU, 2 query groups, no biases, untied embeddings
# (Megatron's fused rotary kernel needs Transformer Engine: off on CPU).
LLAMA = (
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--group-query-attention",
    "--num-query-groups", "2", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--no-rope-fusion",
)  # fmt: skip


def training_command(
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
    environment: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line and environment of a tiny pretraining saving into `tmp/checkpoints`
    (run from `data.root`); `hook` are --eval-hook-override values (None: no hook); `extra` are more
    Megatron arguments (e.g. --load to resume); `environment`: more environment variables."""
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
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp), **(environment or {})}
    return torchrun_command([*head, *args], nproc=nproc), env


def train(tmp: Path, data, *, timeout: int = 600, **options) -> subprocess.CompletedProcess:
    """Run a tiny pretraining to its end (`training_command`'s options)."""
    command, env = training_command(tmp, data, **options)
    return subprocess.run(command, cwd=data.root, env=env, capture_output=True, text=True, timeout=timeout)


class LiveTraining:
    """A tiny pretraining running in the background, in a session of its own (for signals), its output
    going to `tmp/output.txt`."""

    def __init__(self, tmp: Path, data, **options):
        command, env = training_command(tmp, data, **options)
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.output_path = tmp / "output.txt"
        with open(self.output_path, "w") as output:
            self.process = subprocess.Popen(
                command, cwd=data.root, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def output(self) -> str:
        return self.output_path.read_text()

    def wait_for(self, condition, what: str, timeout: float = 300.0, poll_s: float = 0.02):
        """Poll `condition()` until it returns something true; return that."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = condition()
            if found:
                return found
            if self.process.poll() is not None and not condition():
                status = self.process.returncode
                raise AssertionError(f"training ended (status {status}) before {what}:\n{self.output[-4000:]}")
            time.sleep(poll_s)
        raise AssertionError(f"no {what} within {timeout} s:\n{self.output[-4000:]}")

    def saved(self, iteration: int) -> bool:
        return (self.tmp / "checkpoints" / f"iter_{iteration:07d}").is_dir()

    def eval_processes(self) -> list[int]:
        """Pids of the eval processes started so far, in order (from the hook's log lines)."""
        return [int(pid) for pid in re.findall(r"eval process (\d+) ready", self.output)]

    def kill_tree(self) -> None:
        """SIGKILL torchrun and every process under it at once (its workers have process groups of their own)."""
        import psutil

        root = psutil.Process(self.process.pid)
        for process in [root, *root.children(recursive=True)]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait()

    def finish(self, timeout: float = 600.0) -> str:
        """Wait for the end of training; return its output. Fails if training failed."""
        try:
            self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
        assert self.process.returncode == 0, self.output[-4000:]
        return self.output


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
    hook = [HOOKED_BENCHMARKS, f"data_dir={data_dir}", "schedule.every=3", f"export_hf={tmp / 'hf'}"]
    return tmp, ok(train(tmp, demo_data, iterations=7, save_interval=3, hook=hook))


def exported_weights(folder: Path) -> dict:
    """The tensors of a Hugging Face model folder."""
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def assert_exports_equal_the_checkpoints(tmp: Path, iterations: Sequence[int], out: Path) -> None:
    """The hook's `export_hf` folders hold, tensor for tensor, what `export-hf --checkpoint` writes for the
    checkpoint saved at the same iteration: the in-memory weights it evaluated are the saved ones."""
    import torch

    from megatron_eval_hook.export import export_checkpoint

    assert sorted(p.name for p in (tmp / "hf").iterdir()) == [f"iter_{i:07d}" for i in iterations]
    for iteration in iterations:
        name = f"iter_{iteration:07d}"
        from_checkpoint = exported_weights(export_checkpoint(tmp / "checkpoints" / name, out / name))
        from_memory = exported_weights(tmp / "hf" / name)
        assert from_memory.keys() == from_checkpoint.keys()
        for key, tensor in from_checkpoint.items():
            assert torch.equal(from_memory[key], tensor), (name, key)
        assert (tmp / "hf" / name / "tokenizer.json").read_text() == (out / name / "tokenizer.json").read_text()


BENCHMARKS = f"benchmarks=[boolq,'{FACTS}']"
# HELM's per-run statistics that are measurements of the run, not scores of the model
TIMINGS = ("inference_runtime", "batch_request_time", "training_co2_cost", "training_energy_cost")


def backfill(save_dir: Path, out: Path, demo_data, *extra: str) -> int:
    """`megatron-eval backfill` of a run's checkpoints on boolq and facts, into `out`."""
    from megatron_eval_hook.cli import main

    return main([
        "backfill", "--checkpoints", str(save_dir), "--config", str(REPO / "conf" / "helm.yaml"),
        "--override", f"data_dir={demo_data.helm_dir}", "--override", f"output_dir={out}",
        "--override", "max_eval_instances=2", "--override", BENCHMARKS,
        "--tensorboard-dir", str(out / "tensorboard"), *extra,
    ])  # fmt: skip


def scores(ledger: Path, iterations=None, placement=None) -> dict[tuple, float]:
    """(iteration, benchmark, metric, split) -> value of every ok model score in the ledger."""
    return {
        (r["iteration"], r["benchmark"], r["metric"], r["split"]): r["value"]
        for r in Ledger(ledger).results(all_metrics=True)
        if r["status"] == "ok"
        and r["benchmark"] != "broken"
        and not r["metric"].startswith(TIMINGS)
        and (iterations is None or r["iteration"] in iterations)
        and (placement is None or r["placement"] == placement)
    }


def per_instance_correctness(output_dir: Path) -> dict[tuple, float]:
    """(suite, run, instance, trial) -> exact_match, from every per_instance_stats.json HELM wrote under
    `output_dir` (one suite per evaluated iteration)."""
    found = {}
    for path in sorted((output_dir / "helm" / "runs").glob("iter_*/*/per_instance_stats.json")):
        for row in json.loads(path.read_text()):
            for stat in row["stats"]:
                if stat["name"]["name"] == "exact_match" and "perturbation" not in stat["name"]:
                    key = (path.parent.parent.name, path.parent.name, row["instance_id"], row["train_trial_index"])
                    found[key] = stat["mean"]
    return found


def training_loss(tmp: Path) -> list[tuple[int, float]]:
    """Megatron's training loss per iteration, read from the run's offline W&B files under `tmp/wandb`."""
    from wandb_offline import read_run, run_files, series

    (path,) = run_files(tmp / "wandb")
    return series(read_run(path), "lm loss")


def statuses(ledger: Path) -> list[tuple[int, str, str]]:
    return sorted((r["iteration"], r["benchmark"], r["status"]) for r in Ledger(ledger).results())
