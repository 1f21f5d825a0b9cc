"""Sync placement: evaluate in the training processes, right after the save, on the weights as training
shards them; training waits.

The evaluating rank (the job's last) runs an `Evaluator`: HELM, then the ledger first and the sinks (W&B
and TensorBoard through Megatron's own run and writer). In a job of several ranks every rank computes: the
HELM rank's engine calls are split across the data-parallel replicas and each replica's tensor- and
pipeline-parallel ranks compute their share together (`engine/sharded.py`); the other ranks serve those
calls until the evaluation ends. Sequence parallelism is off meanwhile (`sequence_parallel_off`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from megatron_eval_hook.config import EvalHookConfig
from megatron_eval_hook.engine.sharded import Layout, Session, serve
from megatron_eval_hook.evaluator import Evaluator, build_engine
from megatron_eval_hook.helm.benchmarks import Benchmark
from megatron_eval_hook.ledger import Ledger
from megatron_eval_hook.sinks import training_sinks


def unwrap_chunks(model: Any) -> list[Any]:
    """The bare `GPTModel`s inside Megatron's list of (DDP / Float16Module wrapped) model chunks."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(model if isinstance(model, list) else [model])


def unwrap_gpt_model(model: Any) -> Any:
    """The bare `GPTModel` of a model that is not split into pipeline chunks."""
    return unwrap_chunks(model)[0]


# The hook's gloo group of the whole job: the evaluation's own messages, with a timeout no evaluation reaches
# (training's collectives keep theirs: no rank enters one while others evaluate).
GROUP_TIMEOUT = timedelta(hours=24)

# Attributes that switch sequence parallelism on in Megatron's modules (linear layers, embeddings) and configs.
_SEQUENCE_PARALLEL_ATTRIBUTES = ("sequence_parallel", "reduce_scatter_embeddings")


@contextmanager
def sequence_parallel_off(model: Any) -> Iterator[None]:
    """Sequence parallelism off in every module of Megatron's model chunks (and their configs) for the
    duration of the block, each attribute restored to its own value afterwards: the engine's passes hold
    whole sequences on every tensor-parallel rank."""
    switched: list[tuple[Any, str]] = []
    for chunk in unwrap_chunks(model):
        for module in chunk.modules():
            for owner in (module, getattr(module, "config", None)):
                for name in _SEQUENCE_PARALLEL_ATTRIBUTES:
                    if owner is not None and getattr(owner, name, None) is True:
                        setattr(owner, name, False)
                        switched.append((owner, name))
    try:
        yield
    finally:
        for owner, name in switched:
            setattr(owner, name, True)


class SyncPlacement:
    """Runs the HELM suite on the evaluating rank, with every rank computing, and records the outcome."""

    name = "sync"

    def __init__(
        self,
        config: EvalHookConfig,
        benchmarks: list[Benchmark],
        *,
        run: str,
        output_dir: Path,
        ledger: Ledger | None,
        max_sequence_length: int,
        megatron_args: Any,
        config_path: str,
    ):
        self.config = config
        self.max_sequence_length = max_sequence_length
        self._layout: Layout | None = None
        self.evaluator: Evaluator | None = None
        if ledger is None:
            return  # not the evaluating rank: it serves the evaluating rank's engine calls
        self.evaluator = Evaluator(
            config,
            benchmarks,
            run=run,
            output_dir=output_dir,
            ledger=ledger,
            max_sequence_length=max_sequence_length,
            placement=self.name,
            sinks=training_sinks(config, run=run, output_dir=output_dir, megatron_args=megatron_args),
            where=f"--eval-hook-config {config_path}",
            megatron_args=megatron_args,
        )

    def layout(self) -> Layout | None:
        """This rank's place in a sharded evaluation; None in a job of one rank. Collective on every rank the
        first time (it creates the hook's group), which the first evaluated save is."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return None
        if self._layout is None:
            self._layout = Layout.of_megatron(torch.distributed.new_group(backend="gloo", timeout=GROUP_TIMEOUT))
        return self._layout

    def agree_on_skip(self, reason: str | None) -> str | None:
        """Every rank: the evaluating rank's reason to skip this save (None: evaluate), which it alone decides."""
        layout = self.layout()
        if layout is None:
            return reason
        said = [reason]
        torch.distributed.broadcast_object_list(said, src=layout.driver, group=layout.group)
        return said[0]

    def evaluate(self, event: Any, model: Any) -> None:
        """Every rank: evaluate the weights of `model` (Megatron's model chunks) saved at `event.iteration`."""
        from megatron.training import get_tokenizer

        layout = self.layout()
        if layout is not None and not layout.is_driver:

            def build():  # inside `serve`: whatever fails here is said to every rank
                return build_engine(unwrap_gpt_model(model), get_tokenizer(), self.config, self.max_sequence_length)

            serve(build, layout)
            return
        assert self.evaluator is not None

        def model_and_tokenizer():
            return unwrap_gpt_model(model), get_tokenizer()

        if layout is None:
            self.evaluator.evaluate(event.iteration, event.tokens, model_and_tokenizer)
            return
        with Session(layout) as session:
            self.evaluator.evaluate(event.iteration, event.tokens, model_and_tokenizer, serve=session.start)

    def skip(self, event: Any, reason: str) -> None:
        """Record every benchmark of the save at `event.iteration` as skipped, with `reason`."""
        assert self.evaluator is not None
        self.evaluator.skip(event.iteration, event.tokens, reason)

    def publish(self, event: Any, blocked_s: float) -> None:
        """Record the time training was blocked; log the readable line and the W&B row."""
        if self.evaluator is not None:
            self.evaluator.publish(event.iteration, blocked_s=blocked_s)
