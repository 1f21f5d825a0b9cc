"""One rank of a sharded evaluation (under torchrun, gloo, CPU): the tiny GPT of `sharded_model` split by
tensor and pipeline parallelism, its shards filled by checkpoint key from full weights, and the engine's calls
of a scenario run from the last rank through `engine/sharded.py`, every rank taking part.

    torchrun --nproc-per-node N sharded_worker.py --tp T --pp P [--arch llama] --cases CASE,... --weights W --out DIR

Each case (`sharded_cases.CASES`) is one evaluation session. Writes the driver's answers to
DIR/answers-CASE.json, every rank's replica and engine sizes after the session to DIR/sizes-CASE-RANK.json,
and every rank's trace of collective calls to DIR/trace-RANK.json: (operation, ranks of the group, shape,
peer) in the order the rank made them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

from megatron_eval_hook import cpu_shims

cpu_shims.apply()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sharded_cases import CASES, VOCAB, decode, sharded_model  # noqa: E402

TRACED = ("all_reduce", "all_gather", "broadcast", "send", "recv", "gather_object", "broadcast_object_list",
          "all_gather_object", "barrier", "reduce_scatter_tensor", "all_gather_into_tensor")  # fmt: skip


def trace_collectives(log: list) -> None:
    """Record every collective and point-to-point call made through torch.distributed's names."""
    for name in TRACED:
        original = getattr(dist, name)

        def traced(*args, __original=original, __name=name, **kwargs):
            group = kwargs.get("group")
            ranks = tuple(dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size()))
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            peer = kwargs.get("dst", kwargs.get("src")) if __name in ("send", "recv") else None
            log.append((__name, ranks, list(tensor.shape) if tensor is not None else None, peer))
            return __original(*args, **kwargs)

        setattr(dist, name, traced)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cases", default="equal")
    parser.add_argument("--arch", default="gpt", choices=("gpt", "llama"))
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()

    from megatron.core import parallel_state, tensor_parallel

    from megatron_eval_hook.engine import Engine
    from megatron_eval_hook.engine.sharded import Layout, Session, serve
    from megatron_eval_hook.snapshot import load_whole

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(options.tp, options.pp)
    tensor_parallel.random.initialize_rng_tracker()
    group = dist.new_group(backend="gloo", timeout=timedelta(minutes=5))
    log: list = []
    trace_collectives(log)
    layout = Layout.of_megatron(group)
    weights = torch.load(options.weights)
    rank = dist.get_rank()
    for name in options.cases.split(","):
        case = CASES[name]
        built: list[Engine] = []

        def build(case=case, built=built) -> Engine:
            model = sharded_model(options.tp, options.pp, options.arch)
            load_whole(model, weights)
            case.before_build(layout)
            engine = Engine(
                model, vocab_size=VOCAB, max_sequence_length=64, batch_size=3, end_of_text=VOCAB - 1, decode=decode,
                gather_logits=case.gather_logits, memory=case.memory(model),
            )  # fmt: skip
            built.append(engine)
            case.after_build(engine, layout)
            return engine

        if layout.is_driver:
            try:
                with Session(layout) as session:
                    answers = case.drive(session.start(build()))
            except Exception as error:
                answers = {"error": f"{type(error).__name__}: {error}"}
            (options.out / f"answers-{name}.json").write_text(json.dumps(answers))
        else:
            try:
                serve(build, layout)
            except Exception as error:
                print(f"rank {rank}, case {name}: {type(error).__name__}: {error}", flush=True)
        if built:
            sizes = {"replica": layout.replica, **dataclasses.asdict(built[0].sizes)}
            (options.out / f"sizes-{name}-{rank}.json").write_text(json.dumps(sizes))
    (options.out / f"trace-{rank}.json").write_text(json.dumps(log))
    dist.barrier(group)
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
