"""The sync placement's sharded engine on this CPU, side by side in one run: DP=1 against DP=2, and TP=2
against TP=1 on the same weights.

    python bench/sharded.py [--layers 6 --hidden 384 --heads 6 --vocab 8192]

A GPT-2-shaped model (learned positions, LayerNorm, GELU, tied embeddings; random weights, the same in
every run: filled by checkpoint key from one set) answers requests shaped like HELM's default preset:
multiple-choice questions after a shared 5-shot trunk (MMLU, HellaSwag), passages with a yes/no answer
(BoolQ) and generations after a shared trunk (NarrativeQA). Each layout runs under torchrun on gloo, one
thread per rank, and the HELM rank times its engine calls (`engine/sharded.py`: every replica computes its
share). Prints

    RESULT dp2_speedup=<DP=1 time / DP=2 time> tp2_equal=<max abs log-prob difference, TP=2 vs TP=1>

(and whether the TP=2 completions are the TP=1 ones).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def requests(vocab: int, seed: int = 0):
    """(scoring sequences, needed_from, generation requests) shaped like the default preset's."""
    import random

    from megatron_eval_hook.engine import GenerationRequest

    rng = random.Random(seed)

    def text(n: int) -> list[int]:
        return [rng.randrange(1, vocab - 1) for _ in range(n)]

    sequences, needed_from = [], []
    for trunk_length, questions, question_length, answers, answer_length in (
        (400, 40, 60, 4, 2),  # MMLU: 5 examples, 4 letters
        (300, 30, 50, 4, 25),  # HellaSwag: 4 endings
    ):
        trunk = text(trunk_length)
        for _ in range(questions):
            question = trunk + text(question_length)
            for _ in range(answers):
                sequences.append(question + text(answer_length))
                needed_from.append(len(question))
    for _ in range(40):  # BoolQ: a passage, a question, " yes" / " no"
        passage = text(rng.randrange(150, 350))
        for _ in range(2):
            sequences.append(passage + text(1))
            needed_from.append(len(passage))
    trunk = text(300)
    generations = [GenerationRequest(trunk + text(rng.randrange(100, 250)), 20) for _ in range(24)]
    return sequences, needed_from, generations


def worker(options) -> None:
    import torch

    from megatron_eval_hook import cpu_shims

    cpu_shims.apply()
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_eval_hook.engine import Engine
    from megatron_eval_hook.engine.sharded import Layout, Session, serve
    from megatron_eval_hook.snapshot import load_whole, whole_tensors

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(options.tp, 1)
    tensor_parallel.random.initialize_rng_tracker()
    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=options.layers, hidden_size=options.hidden, num_attention_heads=options.heads,
        use_cpu_initialization=True, tensor_model_parallel_size=options.tp, hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    model = GPTModel(
        config, get_gpt_layer_local_spec(), vocab_size=options.vocab, max_sequence_length=1024,
        position_embedding_type="learned_absolute",
    ).eval()  # fmt: skip
    weights = Path(options.out) / "weights.pt"
    if weights.exists():
        load_whole(model, torch.load(weights))
    elif dist.get_world_size() == 1:
        torch.save(whole_tensors(model), weights)
    engine = Engine(model, vocab_size=options.vocab - 64, max_sequence_length=1024, batch_size=16)
    sequences, needed_from, generations = requests(options.vocab - 64)
    layout = Layout.of_megatron(dist.new_group(backend="gloo", timeout=timedelta(minutes=30)))

    def timed(answering) -> dict:
        started = time.perf_counter()
        scores = answering.score(sequences, needed_from)
        generated = answering.generate(generations)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "scores": scores, "generations": [[g.tokens, g.logprobs] for g in generated]}

    if dist.get_world_size() == 1:
        Path(options.result).write_text(json.dumps(timed(engine)))
    elif layout.is_driver:
        with Session(layout) as session:
            Path(options.result).write_text(json.dumps(timed(session.start(engine))))
    else:
        serve(lambda: engine, layout)
    dist.barrier()
    dist.destroy_process_group()


def run(nproc: int, tp: int, out: Path, options, name: str) -> dict:
    result = out / f"{name}.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(29500 + os.getpid() % 1000 + nproc * 7 + tp), __file__, "--role", "worker",
        "--tp", str(tp),
        "--out", str(out), "--result", str(result), "--layers", str(options.layers), "--hidden", str(options.hidden),
        "--heads", str(options.heads), "--vocab", str(options.vocab),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", default="main", choices=["main", "worker"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out")
    parser.add_argument("--result")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192, help="the model's rows (64 of them padding)")
    options = parser.parse_args()
    if options.role == "worker":
        worker(options)
        return
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        one = run(1, 1, out, options, "dp1")  # also writes the weights every other layout loads
        two = run(2, 1, out, options, "dp2")
        tensor = run(2, 2, out, options, "tp2")
    difference = max(abs(a - b) for x, y in zip(one["scores"], tensor["scores"]) for a, b in zip(x, y))  # scored tokens
    same_tokens = [g[0] for g in one["generations"]] == [g[0] for g in tensor["generations"]]
    if same_tokens:
        difference = max(
            difference,
            *(abs(a - b) for x, y in zip(one["generations"], tensor["generations"]) for a, b in zip(x[1], y[1])),
        )
    assert [g[0] for g in one["generations"]] == [g[0] for g in two["generations"]], "DP=2 completions differ"
    print(
        f"DP=1 {one['seconds']:.2f} s, DP=2 {two['seconds']:.2f} s, TP=2 {tensor['seconds']:.2f} s "
        "(one thread per rank)"
    )
    print(f"TP=2 completions identical to TP=1: {same_tokens}")
    print(f"RESULT dp2_speedup={one['seconds'] / two['seconds']:.3f} tp2_equal={difference:.3g}")


if __name__ == "__main__":
    main()
