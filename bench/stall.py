"""How long the async placement stalls training at a save, against a plain copy of the same weights.

One process, one GPT-2-small-sized Megatron GPTModel (124M parameters: 12 layers, hidden 768,
12 heads, 1024 positions, 50304 embedding rows; fp32, random weights), on `--device`
(cpu, or cuda: then the copies go to pinned host memory). For `--rounds` saves, side by side:

  plain: each parameter copied into host tensors allocated once beforehand (pinned on CUDA),
         then one synchronisation; the least any snapshot can cost;
  hook:  `EvalHook.after_save` of the real hook with `placement=async`, i.e. what Megatron's
         training loop waits for after its save: the schedule, the copy into a shared-memory
         snapshot slot, handing it to the eval process.

The eval process is real (it loads each snapshot and evaluates one instance of the demo's
facts benchmark, on the CPU); each round starts once it is idle again, as when evaluation
keeps up with training. Its own work runs on a device of its own in a real run; on this
machine it would compete with the measured copies for the same cores. The first save, which
lays out the shards and allocates the slots once, is reported apart from the rounds.

Prints the median seconds of each and a last line `RESULT stall_ratio=<hook / plain>`.
Target: <= 1.5.

    python bench/stall.py [--device cpu|cuda] [--rounds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples" / "pretrain_gpt2"))  # the demo's data generator

import torch  # noqa: E402
from cpu_run import CPU_ARGS  # noqa: E402

GPT2_SMALL = (
    "--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12",
    "--seq-length", "1024", "--max-position-embeddings", "1024",
)  # fmt: skip
PADDED_VOCAB = 50304  # GPT-2's 50257 tokens padded by Megatron to a multiple of 128


def megatron_args(data, work: Path, device: str) -> argparse.Namespace:
    """Megatron's parsed and validated arguments of a GPT-2-small run with the async hook."""
    from megatron.training.arguments import parse_args, validate_args

    argv = [
        *GPT2_SMALL, "--micro-batch-size", "1", "--train-iters", "1000000", "--lr", "1e-4",
        "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(data.vocab_file),
        "--merge-file", str(data.merge_file), "--save", str(work / "checkpoints"), "--save-interval", "1",
        *CPU_ARGS,  # Megatron's local layers without its fused CUDA kernels (no Apex, no Transformer Engine)
    ]  # fmt: skip
    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Megatron prints every argument
            args = parse_args()
            validate_args(args)
    finally:
        sys.argv = saved
    args.padded_vocab_size = PADDED_VOCAB
    facts = "facts=mmlu:subject=demo_facts,method=multiple_choice_joint"
    args.eval_hook_config = str(REPO / "conf" / "helm.yaml")
    args.eval_hook_override = [
        "placement=async", "eval_device=cpu", f"data_dir={data.helm_dir}", f"benchmarks=['{facts}']",
        "max_eval_instances=1", f"output_dir={work / 'eval'}", "wandb.enabled=false", "tensorboard.enabled=false",
    ]  # fmt: skip
    return args


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=10)
    options = parser.parse_args()

    if options.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        from megatron_eval_hook import cpu_shims

        cpu_shims.apply()
    from demo_data import make_demo_data

    from megatron_eval_hook.hook import install_hook
    from megatron_eval_hook.loading import CheckpointModel

    with tempfile.TemporaryDirectory(prefix="stall-") as folder:
        work = Path(folder)
        data = make_demo_data(work / "data")
        os.chdir(data.root)  # Megatron's GPT2BPETokenizer resolves the name 'gpt2' here (demo_data.py)
        args = megatron_args(data, work, options.device)
        gpt = CheckpointModel(args, work).gpt  # the "training" model: Megatron's GPTModel on the device
        parameters = [p for p in gpt.parameters()]
        with torch.no_grad():
            for parameter in parameters:
                parameter.normal_(0.0, 0.02)  # GPT-2's initialisation: finite scores for the eval process
        count, nbytes = sum(p.numel() for p in parameters), sum(p.nbytes for p in parameters)
        print(f"model: {count / 1e6:.1f}M parameters, {nbytes / 1e6:.0f} MB, on {options.device}")
        pinned = options.device == "cuda"
        host = [torch.zeros(p.shape, dtype=p.dtype, pin_memory=pinned) for p in parameters]  # pages mapped

        def plain_copy() -> None:
            for target, parameter in zip(host, parameters):
                target.copy_(parameter.detach(), non_blocking=True)
            synchronize(options.device)

        hook = install_hook(args)
        started = time.perf_counter()
        hook.after_save(1, [gpt])
        first = time.perf_counter() - started
        hook.placement.wait(600)
        plain_s, hook_s = [], []
        for iteration in range(2, options.rounds + 2):
            started = time.perf_counter()
            plain_copy()
            plain_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            hook.after_save(iteration, [gpt])
            hook_s.append(time.perf_counter() - started)
            if not hook.placement.wait(600):
                raise SystemExit(f"the eval process did not finish iteration {iteration} within 600 s")
        hook.placement.finish()
        failed = [r for r in hook.placement.ledger.results() if r["status"] != "ok"]
        if failed:
            raise SystemExit(f"evaluations failed: {failed}")

    plain, blocked = statistics.median(plain_s), statistics.median(hook_s)
    print(f"first save (shard layout, slot allocation): {first:.3f} s")
    print(f"plain copy into preallocated host memory: median {plain:.4f} s over {len(plain_s)} saves")
    print(f"hook (async placement), training blocked: median {blocked:.4f} s over {len(hook_s)} saves")
    print(f"RESULT stall_ratio={blocked / plain:.3f}")


if __name__ == "__main__":
    main()
