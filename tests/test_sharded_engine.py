"""The engine on a model split as training splits it (tensor, pipeline and data parallelism, gloo on CPU)
answers as the unsharded engine does on the same weights, and every rank makes the same collective calls
whatever happens."""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from cpu_run import torchrun_command
from sharded_cases import INJECTED, VOCAB, decode, generation_requests, memory_positions, scored, sharded_model

from megatron_eval_hook.engine import Engine, RequestTooLong
from megatron_eval_hook.snapshot import whole_tensors

WORKER = Path(__file__).resolve().parent / "sharded_worker.py"

# layout -> (TP, PP, processes, cases run in it, architecture)
LAYOUTS = {
    "tp2": (2, 1, 2, "equal,gathered,faults,memory", "gpt"),
    "pp2": (1, 2, 2, "equal,faults", "gpt"),
    "dp2": (1, 1, 2, "equal,faults,build_fails", "gpt"),
    "tp2xpp2": (2, 2, 4, "equal", "gpt"),
    "tp2xdp2": (2, 1, 4, "equal,faults,memory", "gpt"),
    "llama-tp2xpp2": (2, 2, 4, "equal,gathered", "llama"),
}


class References(dict):
    """Per architecture, made on first use: the unsharded model's engine and its weights saved by checkpoint key."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def __missing__(self, arch: str):
        model = sharded_model(arch=arch)
        path = self.folder / f"weights-{arch}.pt"
        torch.save(whole_tensors(model), path)
        engine = Engine(
            model, vocab_size=VOCAB, max_sequence_length=64, batch_size=3, end_of_text=VOCAB - 1, decode=decode
        )
        self[arch] = engine, path
        return self[arch]


@pytest.fixture(scope="module")
def references(megatron_world, tmp_path_factory):
    return References(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def sharded_run(request, references, tmp_path_factory):
    """The worker's cases run once per layout: (layout, answers per case, each rank's trace)."""
    tp, pp, nproc, cases, arch = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    command = torchrun_command(
        [str(WORKER), "--tp", str(tp), "--pp", str(pp), "--arch", arch, "--cases", cases,
         "--weights", str(references[arch][1]), "--out", str(out)], nproc=nproc,
    )  # fmt: skip
    env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    answers = {case: json.loads((out / f"answers-{case}.json").read_text()) for case in cases.split(",")}
    traces = [json.loads((out / f"trace-{rank}.json").read_text()) for rank in range(nproc)]
    sizes = {
        (case, rank): json.loads(path.read_text())
        for case in cases.split(",")
        for rank in range(nproc)
        if (path := out / f"sizes-{case}-{rank}.json").exists()
    }
    return request.param, answers, traces, result.stdout, sizes


def expected_answers(engine: Engine, budget_shift: int = 0):
    sequences, needed_from = scored()
    return engine.score(sequences, needed_from), engine.generate(generation_requests(budget_shift))


def assert_same_generations(got, expected):
    assert [g[0] for g in got] == [g.tokens for g in expected]  # identical greedy completions
    assert [g[2] for g in got] == [g.finish_reason for g in expected]
    for (_, logprobs, _), generation in zip(got, expected):
        assert logprobs == pytest.approx(generation.logprobs, abs=1e-5)


@pytest.mark.slow
def test_sharded_scores_and_generations_equal_the_unsharded_engine(sharded_run, references):
    layout, answers, *_ = sharded_run
    scores, generations = expected_answers(references[LAYOUTS[layout][4]][0])
    for case in ("equal", "gathered", "memory"):
        if case not in answers:
            continue
        assert "error" not in answers[case], answers[case]
        for got, expected in zip(answers[case]["scores"], scores, strict=True):
            assert got == pytest.approx(expected, abs=1e-5), case
        assert_same_generations(answers[case]["generations"], generations)
    assert sum(len(s) for s in scores) > 50
    if LAYOUTS[layout][4] == "gpt":  # these weights' completions run into a stop sequence: checked on the way
        assert any(g.finish_reason == "stop" for g in generations)


@pytest.mark.slow
def test_faults_reach_the_helm_rank_and_later_calls_are_answered(sharded_run, references):
    layout, answers, *_ = sharded_run
    reference = references[LAYOUTS[layout][4]]
    if "faults" not in answers:
        pytest.skip(f"{layout} runs no fault case")
    outcome = answers["faults"]
    assert "context window" in outcome["too_long"]  # RequestTooLong, raised on the HELM rank
    assert INJECTED in outcome["failed"]
    sequences, _ = scored()
    assert outcome["one"][0] == pytest.approx(reference[0].score(sequences[:1])[0], abs=1e-5)
    assert outcome["none"] == []
    assert_same_generations(outcome["generations"], expected_answers(reference[0], budget_shift=1)[1])
    with pytest.raises(RequestTooLong):  # the unsharded engine refuses the same request
        reference[0].score([[1] * 65])


@pytest.mark.slow
def test_a_rank_that_cannot_build_its_engine_ends_the_session_on_every_rank(sharded_run):
    layout, answers, _, output, _ = sharded_run
    if "build_fails" not in answers:
        pytest.skip(f"{layout} does not inject a build failure")
    assert "rank 0 could not start" in answers["build_fails"]["error"]
    assert "injected: no memory" in answers["build_fails"]["error"]
    assert "MemoryError: injected" in output  # rank 0 says why, and the job still ends normally


@pytest.mark.slow
def test_every_rank_makes_the_same_collective_calls_in_each_group(sharded_run):
    """(operation, shape) sequences agree among the members of every group, and each send meets a receive
    of the same shape, in order, whatever the case (faults and failed builds included)."""
    layout, _, traces, *_ = sharded_run
    sends, receives = defaultdict(list), defaultdict(list)
    for rank, trace in enumerate(traces):
        for op, _, shape, peer in trace:
            if op == "send":
                sends[(rank, peer)].append(shape)
            elif op == "recv":
                receives[(peer, rank)].append(shape)
    groups = {tuple(ranks) for trace in traces for _, ranks, _, _ in trace}
    for group in groups:
        calls = [
            [(op, shape if not op.endswith("_object") else None) for op, ranks, shape, _ in traces[rank]
             if tuple(ranks) == group and op not in ("send", "recv")]
            for rank in group
        ]  # fmt: skip
        assert all(c == calls[0] for c in calls), f"{layout}: the ranks of group {group} diverged"
    assert sends == receives
    if layout.startswith("pp") or "pp2" in layout:
        assert sends, "pipeline stages exchanged nothing"


@pytest.mark.slow
def test_the_ranks_of_a_replica_plan_for_the_smallest_memory_among_them(sharded_run):
    """Each rank's memory holds passes of another size: after the session starts, every rank of a replica
    plans passes of its replica's smallest (its ranks must make the same passes), each replica its own."""
    layout, answers, _, _, sizes = sharded_run
    if "memory" not in answers:
        pytest.skip(f"{layout} runs no memory case")
    replicas = defaultdict(list)
    for (case, rank), agreed in sizes.items():
        if case == "memory":
            replicas[agreed["replica"]].append((rank, agreed))
    assert sum(len(ranks) for ranks in replicas.values()) == LAYOUTS[layout][2]
    for members in replicas.values():
        smallest = min(memory_positions(rank) for rank, _ in members)
        assert {agreed["pass_positions"] for _, agreed in members} == {smallest}
        assert len({tuple(agreed.values()) for _, agreed in members}) == 1
    unlimited = {agreed["pass_positions"] for (case, _), agreed in sizes.items() if case == "equal"}
    assert unlimited and min(unlimited) > max(memory_positions(rank) for rank in range(LAYOUTS[layout][2]))
