"""One HELM rank's engine calls computed by every rank of a training job, on the weights as training shards them.

HELM runs on one rank, the driver (the job's last rank, which holds Megatron's W&B run). Each of its engine
calls (`score`, `generate`) is broadcast to every rank over a gloo group of the whole job. Every
data-parallel replica then computes its share of the requests (`Planner.split_scoring` and
`split_generation`: a question stays with its answers, a trunk with the requests that share it), each
replica's tensor- and pipeline-parallel ranks through their own `Engine` in step, and one rank per replica
sends its answers back to the driver. The other ranks wait in `serve` until the driver's `Session` ends.

Every rank makes the same sequence of collective calls whatever happens: a replica with no share computes
nothing but still sends its (empty) answers; an exception in a replica's share travels to the driver as its
answer and is raised there, where the evaluation records it; a rank that cannot build its engine says so
when the session starts, and every rank then leaves the session together. The shares depend only on the
requests, so every rank computes the same ones without asking. The ranks of a replica plan their passes for
the smallest memory among them (`memory.py`), agreed when the session starts.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from megatron_eval_hook.engine.core import Engine
from megatron_eval_hook.engine.memory import Sizes
from megatron_eval_hook.engine.requests import Generation, GenerationRequest


@dataclass(frozen=True)
class Layout:
    """Where this rank stands in the job: `group` holds every rank (gloo, a long timeout, so that no
    training collective can time out while ranks evaluate), `driver` is the HELM rank's global rank,
    `replica` this rank's data-parallel rank among `replicas`, and `reports` says whether this rank sends its
    replica's answers (one rank per replica: tensor rank 0 of the last pipeline stage)."""

    group: Any
    driver: int
    replica: int
    replicas: int
    reports: bool

    @property
    def is_driver(self) -> bool:
        return dist.get_rank() == self.driver

    @classmethod
    def of_megatron(cls, group: Any) -> Layout:
        """This rank's layout from Megatron's parallel state; the driver is the last rank of `group`."""
        from megatron.core import parallel_state

        return cls(
            group=group,
            driver=dist.get_world_size(group) - 1,
            replica=parallel_state.get_data_parallel_rank(),
            replicas=parallel_state.get_data_parallel_world_size(),
            reports=parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_last_stage(),
        )


class SessionAborted(RuntimeError):
    """A rank could not start its part of the evaluation; every rank left the session."""


class ShardedEngine:
    """The driver's engine: `score` and `generate` as `Engine`'s, computed by every replica of the job."""

    def __init__(self, engine: Engine, layout: Layout):
        self.engine = engine
        self.layout = layout
        self.max_sequence_length = engine.max_sequence_length

    def score(self, sequences: Sequence[Sequence[int]], needed_from: Sequence[int] | None = None) -> list[list[float]]:
        return self._call(("score", [list(s) for s in sequences], None if needed_from is None else list(needed_from)))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return self._call(("generate", list(requests)))

    def release(self) -> None:
        self.engine.release()

    def _call(self, command: tuple) -> list:
        dist.broadcast_object_list([command], src=self.layout.driver, group=self.layout.group)
        return _compute(self.engine, self.layout, command)


class Session:
    """On the driver, the span of one evaluation during which the other ranks serve it: `start(engine)` (once
    the driver's engine exists) checks that every rank has its own and returns the `ShardedEngine`; leaving
    the block releases the other ranks, also when the driver failed before starting."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.agreed = False  # every rank has said whether it can go on
        self.serving = False  # ... and all could: the other ranks serve until told to stop

    def __enter__(self) -> Session:
        return self

    def start(self, engine: Engine) -> ShardedEngine:
        self.agreed = True
        engine.resize(_agree(self.layout, None, engine.sizes))
        self.serving = True
        return ShardedEngine(engine, self.layout)

    def __exit__(self, kind, error, traceback) -> None:
        if not self.agreed:  # the driver failed before its engine existed: the others must not wait for it
            self.agreed = True
            try:
                _agree(self.layout, f"{kind.__name__}: {error}" if kind is not None else "no engine was started", None)
            except SessionAborted:
                pass
        elif self.serving:
            dist.broadcast_object_list([None], src=self.layout.driver, group=self.layout.group)


def serve(build: Any, layout: Layout) -> None:
    """On every rank but the driver: build this rank's engine (`build()`), then compute the driver's calls
    until its session ends. Returns quietly when any rank could not start; raises what `build` raised."""
    engine, failure, raised = None, None, None
    try:
        engine = build()
    except Exception as error:
        failure, raised = f"{type(error).__name__}: {error}", error
    try:
        sizes = _agree(layout, failure, None if engine is None else engine.sizes)
    except SessionAborted:
        if raised is not None:
            raise raised from None
        return
    engine.resize(sizes)
    while True:
        command = [None]
        dist.broadcast_object_list(command, src=layout.driver, group=layout.group)
        if command[0] is None:
            return
        _compute(engine, layout, command[0])


def _agree(layout: Layout, failure: str | None, sizes: Sizes | None) -> Sizes:
    """Every rank says whether it can go on (`failure`: why not) and what its engine's passes and caches may
    hold (`sizes`); raises `SessionAborted` on every rank when one cannot, naming it. Returns the sizes every
    rank of this rank's replica can hold, which its ranks then all plan for (they must make the same passes);
    the replicas' shares do not depend on them."""
    said: list[Any] = [None] * dist.get_world_size(layout.group)
    dist.all_gather_object(said, (failure, layout.replica, sizes), group=layout.group)
    failed = [(rank, why) for rank, (why, _, _) in enumerate(said) if why is not None]
    if failed:
        rank, why = failed[0]
        raise SessionAborted(f"rank {rank} could not start its part of the evaluation: {why}")
    first, *others = [own for _, replica, own in said if replica == layout.replica]
    return first.smallest(*others)


def _compute(engine: Engine, layout: Layout, command: tuple) -> list | None:
    """This replica's share of `command`, computed; on the driver, every replica's answers in request order."""
    op, *args = command
    if op == "score":
        sequences, needed_from = args
        count = len(sequences)
        shares = engine.planner.split_scoring(sequences, layout.replicas) if layout.replicas > 1 else [range(count)]
        mine = list(shares[layout.replica])
        share_of = (lambda values: None) if needed_from is None else (lambda values: [values[i] for i in mine])  # noqa: E731
        run = lambda: engine.score([sequences[i] for i in mine], share_of(needed_from))  # noqa: E731
    else:
        (requests,) = args
        count = len(requests)
        shares = (
            engine.planner.split_generation(
                [r.prompt for r in requests], [r.max_new_tokens for r in requests], layout.replicas
            )
            if layout.replicas > 1
            else [range(count)]
        )
        mine = list(shares[layout.replica])
        run = lambda: engine.generate([requests[i] for i in mine])  # noqa: E731
    try:
        answer: Any = (mine, run() if mine else [])
    except Exception as error:  # the driver raises it; every rank goes on to the gather
        answer = _sendable(error, layout.replica)
    answers: list[Any] | None = [None] * dist.get_world_size(layout.group) if layout.is_driver else None
    dist.gather_object(answer if layout.reports else None, answers, dst=layout.driver, group=layout.group)
    if answers is None:
        return None
    results: list[Any] = [None] * count
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
        if answer is not None:
            for i, value in zip(*answer):
                results[i] = value
    return results


def _sendable(error: Exception, replica: int) -> Exception:
    """`error` as it can travel to the driver: itself when it pickles (the driver's client knows some kinds,
    e.g. `RequestTooLong`), else a RuntimeError with its text; either names the replica."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"data-parallel replica {replica}: {type(error).__name__}: {error}")
    if error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]} (data-parallel replica {replica})", *error.args[1:])
    return error
