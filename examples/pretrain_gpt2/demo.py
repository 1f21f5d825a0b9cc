"""The CPU demo: a tiny GPT-2 (or Llama-style) pretraining whose every save is evaluated with HELM in-process.

    python examples/pretrain_gpt2/demo.py --out outputs/demo      (what `make demo` runs)
    python examples/pretrain_gpt2/demo.py --out outputs/demo-async --override placement=async
    python examples/pretrain_gpt2/demo.py --out outputs/demo-llama --arch llama

1. Generates the demo's data (corpus, BPE tokenizer, Megatron .bin/.idx, HELM benchmark files).
2. Runs Megatron's real training loop (`pretrain_gpt2.py` under torchrun, one CPU process) with
   `--eval-hook-config conf/demo.yaml`; the hook evaluates each save right after it is written.
3. Prints the scores per iteration from the ledger, and where everything was written.

It exits non-zero when a scheduled save has no `ok` evaluation, or when the learnable
benchmark did not rise by at least `--min-rise` between the first and the last save.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

# Megatron's imports warn that Transformer Engine and Apex are absent, as they are on every CPU machine.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from cpu_run import CPU_ARGS, PRETRAIN_GPT2, torchrun_command  # noqa: E402
from demo_data import make_demo_data  # noqa: E402

from megatron_eval_hook.ledger import Ledger  # noqa: E402

LEARNABLE = "facts"

# A tiny GPT-2 (learned positions, LayerNorm, GELU, tied embeddings) that learns the demo's
# facts in a few hundred iterations on two CPU cores.
MODEL_ARGS = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
    "--seq-length", "256", "--max-position-embeddings", "256", "--normalization", "LayerNorm",
    "--position-embedding-type", "learned_absolute",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
]  # fmt: skip
# --arch llama: the same sizes Llama-style (rotary positions, RMSNorm, SwiGLU, 2 query groups, no biases,
# untied embeddings; Megatron's fused rotary kernel needs Transformer Engine, so it is off on CPU).
LLAMA_ARGS = [
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--group-query-attention",
    "--num-query-groups", "2", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--no-rope-fusion",
    # it learns faster than the GPT-2: at 3e-3 it knew 10 of the 14 facts by the first save (iteration 25), at
    # 1e-3 9 of them; saved every 10 iterations (SAVE_INTERVAL) at 1e-3, 4 at iteration 10 and 9 at 30
    "--lr", "1e-3", "--min-lr", "1e-4",
]  # fmt: skip
SAVE_INTERVAL = {"gpt2": 25, "llama": 10}

# The lines of the training job shown on the console (all of them go to <out>/train.log): Megatron's
# iteration lines (shortened to the iteration and the loss) and checkpoint lines, and the hook's.
SHOWN = re.compile(r"saving checkpoint at iteration|^\[eval-hook\]")
ITERATION = re.compile(r"\] iteration +(\d+)/ *(\d+) \|.*\| lm loss: ([0-9.E+-]+)")
TRAINING_ARGS = [
    "--micro-batch-size", "16", "--global-batch-size", "16",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20",
    "--weight-decay", "0.01", "--seed", "1234", "--ckpt-format", "torch_dist",
    "--log-interval", "10", "--eval-iters", "0", "--eval-interval", "1000000",
]  # fmt: skip


def train(out: Path, data, iterations: int, save_interval: int, overrides: list[str], arch: str = "gpt2") -> None:
    command = torchrun_command([
        str(PRETRAIN_GPT2), *MODEL_ARGS, *TRAINING_ARGS, *(LLAMA_ARGS if arch == "llama" else []), *CPU_ARGS,
        "--train-iters", str(iterations), "--save-interval", str(save_interval),
        "--save", str(out / "checkpoints"),
        "--tokenizer-type", "GPT2BPETokenizer",
        "--vocab-file", str(data.vocab_file), "--merge-file", str(data.merge_file),
        "--data-path", str(data.data_prefix), "--split", "100,0,0",
        "--tensorboard-dir", str(out / "tensorboard"),  # Megatron logs its loss to W&B only beside TensorBoard
        "--wandb-project", "megatron-eval-demo", "--wandb-exp-name", "demo", "--wandb-save-dir", str(out),
        "--eval-hook-config", str(REPO / "conf" / "demo.yaml"),
        "--eval-hook-override", f"data_dir={data.helm_dir}",
        "--eval-hook-override", f"output_dir={out / 'eval'}",
        "--eval-hook-override", f"ledger={out / 'ledger.sqlite'}",
        *(flag for override in overrides for flag in ("--eval-hook-override", override)),
    ])  # fmt: skip
    env = {
        **os.environ,
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)),
    }
    # GPT2BPETokenizer resolves the name "gpt2" from the working directory (see demo_data.py).
    log = out / "train.log"
    print(f"training: Megatron's and the hook's whole output goes to {log}; here, the lines that tell the story")
    with open(log, "w") as whole:
        process = subprocess.Popen(
            command, cwd=data.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            whole.write(line)
            step = ITERATION.search(line)
            if step:
                print(f"iteration {step[1]:>4}/{step[2]}  lm loss {float(step[3]):.3f}", flush=True)
            elif SHOWN.search(line):
                print(line.rstrip(), flush=True)
    if process.wait() != 0:
        tail = log.read_text().splitlines()[-60:]
        print("\n".join(["", f"training failed (exit status {process.returncode}); the end of {log}:", *tail]))
        raise SystemExit(process.returncode)


def score_table(rows: list[dict]) -> tuple[list[str], dict[int, dict[str, str]]]:
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    table: dict[int, dict[str, str]] = {}
    for r in rows:
        cell = f"{r['value']:.3f}" if r["status"] == "ok" else r["status"]
        table.setdefault(r["iteration"], {})[r["benchmark"]] = cell
    return benchmarks, table


def report(out: Path, iterations: int, save_interval: int, min_rise: float) -> int:
    rows = Ledger(out / "ledger.sqlite").results(run="demo")
    benchmarks, table = score_table(rows)
    print("\nHELM scores per saved iteration (main metric of each benchmark):\n")
    header = ["iteration", *benchmarks]
    widths = [max(len(h), 9) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for iteration in sorted(table):
        cells = [str(iteration), *(table[iteration].get(b, "-") for b in benchmarks)]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))

    problems = []
    saves = sorted(set(range(save_interval, iterations + 1, save_interval)) | {iterations})
    for iteration in saves:
        statuses = {r["benchmark"]: r for r in rows if r["iteration"] == iteration}
        not_ok = {b: (r["status"], r["error"]) for b, r in statuses.items() if r["status"] != "ok"}
        if not statuses or not_ok:
            problems.append(f"iteration {iteration}: no ok evaluation: {not_ok or 'nothing recorded'}")
    learned = [(r["iteration"], r["value"]) for r in rows if r["benchmark"] == LEARNABLE and r["status"] == "ok"]
    if learned:
        (first_it, first), (last_it, last) = min(learned), max(learned)
        print(
            f"\n{LEARNABLE}: {first:.3f} at iteration {first_it} -> {last:.3f} at iteration {last_it} "
            f"(rise {last - first:+.3f}, required {min_rise:+.2f})"
        )
        if last - first < min_rise:
            problems.append(f"{LEARNABLE} rose by {last - first:.3f} < {min_rise}")
    print(f"\nledger:       {out / 'ledger.sqlite'}   (megatron-eval results --ledger {out / 'ledger.sqlite'})")
    print(f"W&B (offline): {out / 'wandb'}")
    print(f"HELM outputs: {out / 'eval' / 'helm' / 'runs'}")
    print(f"checkpoints:  {out / 'checkpoints'}")
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "demo")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--save-interval", type=int, default=None, help="default: 25 (gpt2), 10 (llama)")
    parser.add_argument("--min-rise", type=float, default=0.3)
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="one more hook config override"
    )
    parser.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2", help="the model's architecture")
    args = parser.parse_args()
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)  # a fresh run every time: no stale checkpoints, ledger rows or W&B runs
    started = time.time()
    data = make_demo_data(out / "data")
    print(f"demo data written to {data.root} in {time.time() - started:.1f} s")
    save_interval = args.save_interval or SAVE_INTERVAL[args.arch]
    train(out, data, args.iterations, save_interval, args.override, args.arch)
    status = report(out, args.iterations, save_interval, args.min_rise)
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
