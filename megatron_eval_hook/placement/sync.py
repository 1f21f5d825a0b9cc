"""Sync placement: evaluate in the training processes, right after the save, on the weights as training
shards them; training waits.

The evaluating rank (the job's last) runs an `Evaluator`: HELM, then the ledger first and the sinks (W&B
and TensorBoard through Megatron's own run and writer). In a job of several ranks every rank computes: the
HELM rank's engine calls are split across the data-parallel replicas and each replica's tensor- and
pipeline-parallel ranks compute their share together (`engine/sharded.py`); the other ranks serve those
calls until the evaluation ends. Sequence parallelism is off meanwhile (`sequence_parallel_off`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_eval_hook.checkpoints import tokens_seen
from megatron_eval_hook.config import ConfigError, EvalHookConfig
from megatron_eval_hook.engine.sharded import Layout, Session, serve
from megatron_eval_hook.evaluator import Evaluator, build_engine
from megatron_eval_hook.helm.benchmarks import Benchmark
from megatron_eval_hook.ledger import Ledger
from megatron_eval_hook.placement import SaveEvent
from megatron_eval_hook.sinks import training_sinks

logger = logging.getLogger("megatron_eval_hook")


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
        ledger_path: Path,
        max_sequence_length: int,
        megatron_args: Any,
        config_path: str,
        rank: int,
        world_size: int,
        evaluating_rank: int,
    ):
        refuse_unsupported_layouts(megatron_args, config)
        self.config = config
        self.args = megatron_args
        self.max_sequence_length = max_sequence_length
        self._layout: Layout | None = None
        self.evaluator: Evaluator | None = None
        if rank != evaluating_rank:
            return  # it serves the evaluating rank's engine calls
        self.evaluator = Evaluator(
            config,
            benchmarks,
            run=run,
            output_dir=output_dir,
            ledger=Ledger(ledger_path),
            max_sequence_length=max_sequence_length,
            placement=self.name,
            sinks=training_sinks(config, run=run, output_dir=output_dir, megatron_args=megatron_args),
            where=f"--eval-hook-config {config_path}",
            megatron_args=megatron_args,
        )

    def at_save(self, event: SaveEvent, model: Any) -> None:
        """Every rank: evaluate the weights just saved, or skip them when the job is stopping on its exit
        signal (a preempted job must stop within its grace period: do not spend it here). The evaluating
        rank decides the skip; every rank learns it. Training waits, then goes on as it was."""
        self._run(event, model, skip_reason=(
            "the job received its exit signal (e.g. preemption) and is stopping; "
            "evaluating now could outlast the grace period"
            if self.evaluator is not None and event.exiting
            else None
        ), record_skip=True)  # fmt: skip

    def at_load(self, event: SaveEvent, model: Any) -> None:
        """Every rank, before iteration 1 of a restarted job: evaluate the benchmarks the save it resumed from
        lacks an `ok` result for (killed, preempted, skipped on the exit signal, failed fewer than
        `resume.max_attempts` times), on the weights just loaded. The evaluating rank decides; every rank
        learns it."""
        only = None
        if self.evaluator is not None:
            only = self.evaluator.missing(event.iteration, self.config.resume.max_attempts)
            if only:
                logger.info("iteration %d (resumed from): evaluating %s, which it lacks", event.iteration, only)
        self._run(event, model, skip_reason=None if only or self.evaluator is None else "complete", only=only)

    def before_load(self, iterations: list[int], load: Callable[[int], None], model: Any) -> None:
        """Every rank, before a restarted job loads the save it resumes from: each earlier save in `iterations`
        that lacks an `ok` result (and failed fewer than `resume.max_attempts` times) is loaded into `model` with
        Megatron's own loading, as training shards it, and evaluated. The evaluating rank decides which; every
        rank learns it."""
        plan: list[tuple[int, list[str]]] | None = None
        if self.evaluator is not None:
            lacking = ((i, self.evaluator.missing(i, self.config.resume.max_attempts)) for i in iterations)
            plan = [(iteration, only) for iteration, only in lacking if only]
            if plan:
                logger.info("resuming: %d earlier save(s) lack results (iterations %s); evaluated from their "
                            "checkpoints before iteration 1 (resume.evaluate_missing=false leaves them to "
                            "`megatron-eval backfill`)", len(plan), [i for i, _ in plan])  # fmt: skip
        for iteration, only in self._from_driver(plan) or []:
            error = None
            try:
                load(iteration)
            except Exception as raised:  # a checkpoint that cannot be read is this save's failure, not training's
                error = f"{type(raised).__name__}: {raised}"
                logger.exception("iteration %d: loading its checkpoint failed", iteration)
            if not self._everywhere(error is None):
                if self.evaluator is not None:
                    self.evaluator.fail(
                        iteration, None, f"its checkpoint could not be loaded: {error or 'on another rank'}", only
                    )
                continue
            if self.evaluator is not None:
                logger.info("iteration %d (saved before the one resumed from): evaluating %s, which it lacks",
                            iteration, only)  # fmt: skip
            self._run(SaveEvent(iteration, False, tokens_seen(self.args)), model, skip_reason=None, only=only)

    def _run(self, event: SaveEvent, model: Any, skip_reason: str | None, record_skip: bool = False,
             only: list[str] | None = None) -> None:  # fmt: skip
        started = time.perf_counter()
        evaluated = False
        try:
            reason = self._agree_on_skip(skip_reason)
            if reason is not None:
                if self.evaluator is not None and record_skip:
                    self.evaluator.skip(event.iteration, event.tokens, reason)
            else:
                evaluated = self.evaluator is not None
                with preserved_training_state(model), sequence_parallel_off(model):
                    self._evaluate(event, model, only)
        except Exception:  # an evaluation must never kill training; the evaluator recorded the failure
            logger.exception("evaluation at iteration %d failed", event.iteration)
        if evaluated:
            self.evaluator.publish(event.iteration, blocked_s=time.perf_counter() - started)

    def at_log(self) -> None:
        """The evaluating rank: one row of scores a sink still lacks (`Deliveries`), if any; a save's own scores
        were logged at the save."""
        if self.evaluator is not None:
            self.evaluator.deliveries.deliver(1)

    def at_end(self, exiting: bool) -> None:
        """Every evaluation ended at its save: log what a sink still lacks."""
        if self.evaluator is not None:
            self.evaluator.deliveries.flush()

    def _layout_of_job(self) -> Layout | None:
        """This rank's place in a sharded evaluation; None in a job of one rank. Collective on every rank the
        first time (it creates the hook's group), which the first evaluated save is."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return None
        if self._layout is None:
            self._layout = Layout.of_megatron(torch.distributed.new_group(backend="gloo", timeout=GROUP_TIMEOUT))
        return self._layout

    def _agree_on_skip(self, reason: str | None) -> str | None:
        """Every rank: the evaluating rank's reason to skip this save (None: evaluate), which it alone decides."""
        return self._from_driver(reason)

    def _from_driver(self, value: Any) -> Any:
        """Every rank: the evaluating rank's `value`."""
        layout = self._layout_of_job()
        if layout is None:
            return value
        said = [value]
        torch.distributed.broadcast_object_list(said, src=layout.driver, group=layout.group)
        return said[0]

    def _everywhere(self, true: bool) -> bool:
        """Every rank: whether `true` holds on every rank."""
        layout = self._layout_of_job()
        if layout is None:
            return true
        flag = torch.tensor([int(true)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=layout.group)
        return bool(flag.item())

    def _evaluate(self, event: SaveEvent, model: Any, only: list[str] | None = None) -> None:
        """Every rank: evaluate the weights of `model` (Megatron's model chunks) saved at `event.iteration`."""
        from megatron.training import get_tokenizer

        layout = self._layout_of_job()
        if layout is not None and not layout.is_driver:

            def build():  # inside `serve`: whatever fails here is said to every rank
                return build_engine(unwrap_gpt_model(model), get_tokenizer(), self.config, self.max_sequence_length)

            serve(build, layout)
            return
        assert self.evaluator is not None

        def model_and_tokenizer():
            return unwrap_gpt_model(model), get_tokenizer()

        if layout is None:
            self.evaluator.evaluate(event.iteration, event.tokens, model_and_tokenizer, only=only)
            return
        with Session(layout) as session:
            self.evaluator.evaluate(event.iteration, event.tokens, model_and_tokenizer, only=only, serve=session.start)


def refuse_unsupported_layouts(args: Any, config: EvalHookConfig) -> None:
    """The layouts the sync placement cannot evaluate on yet, refused before the first iteration."""
    refused = {
        "--context-parallel-size": (getattr(args, "context_parallel_size", 1) or 1) > 1,
        "--virtual-pipeline-model-parallel-size (interleaved pipeline)": getattr(
            args, "virtual_pipeline_model_parallel_size", None
        )
        is not None,
        "--num-experts (mixture of experts)": bool(getattr(args, "num_experts", None)),
        "--expert-model-parallel-size": (getattr(args, "expert_model_parallel_size", 1) or 1) > 1,
    }
    sharded = (getattr(args, "tensor_model_parallel_size", 1) or 1) * (
        getattr(args, "pipeline_model_parallel_size", 1) or 1
    ) > 1
    refused["export_hf with --tensor/--pipeline-model-parallel-size > 1"] = sharded and bool(config.export_hf)
    flags = [flag for flag, bad in refused.items() if bad]
    if flags:
        raise ConfigError(
            f"the sync placement does not evaluate this layout yet: {', '.join(flags)}. Fix: placement=async "
            "(its eval process assembles the whole model on a spare device), or evaluate the saved "
            "checkpoints afterwards with `megatron-eval backfill`."
        )


@contextmanager
def preserved_training_state(model: Any):
    """Evaluate with the model in eval mode and every RNG untouched, then put training back
    exactly as it was: train mode, and the Python, NumPy, torch (CPU and CUDA) and Megatron
    model-parallel RNG states, so training continues bit-identically."""
    chunks = model if isinstance(model, list) else [model]
    modes = [chunk.training for chunk in chunks]
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = _cuda_rng_states()
    tracker_states = _megatron_rng_states()
    try:
        yield
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if tracker_states is not None:
            from megatron.core import tensor_parallel

            tensor_parallel.get_cuda_rng_tracker().set_states(tracker_states)


def _cuda_rng_states():
    if not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.get_rng_state_all()
    except (AssertionError, RuntimeError):  # torch built without CUDA behind CPU shims
        return None


def _megatron_rng_states():
    from megatron.core import tensor_parallel

    try:
        return tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # no tracker initialised (e.g. a model built outside Megatron's initialisation)
        return None
