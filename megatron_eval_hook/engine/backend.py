"""The engine's forward passes: the model called on a pass's positions, with only the rows of the output layer
that are read computed, and only what is read kept (`Targets`: given tokens' log-probabilities; `Greedy`:
the most likely token and its log-probability).

`LocalBackend` runs a model that is whole on this rank. `ParallelBackend` runs this rank's part of a model
split by tensor and pipeline parallelism, the way training split it. Every rank of the model-parallel group
makes the same calls in the same order (each computes the same plan, `plan.py`). Per pipeline stage a call
receives the hidden states of the stage before, runs the stage's layers and sends them on; the last stage
reads the output layer and broadcasts what it read to the other stages, which need the chosen tokens to
feed the next decoding step.

Under tensor parallelism the output layer's vocabulary is split across the group. Log-probabilities are
read from the split logits without gathering them: the log of the normaliser is reduced across the group (a
maximum, then a sum of exponentials), a target's logit is taken on the rank that holds its row, the most
likely token is the best of each rank's best. The vocabulary's padding rows (past the tokenizer's) are
masked on the rank that holds them. `gather_logits=True` gathers the full logits instead (for exactness
checks): the two agree to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer's vocabulary (`size`: the output layer's rows past it are padding) and the group the
    output layer's rows are split across (None: all of them on this rank)."""

    size: int
    group: Any = None

    def log_normalizer(self, logits: torch.Tensor) -> torch.Tensor:
        """log(sum(exp(logits))) per row [m] over the whole vocabulary, from this rank's [m, width] slice of
        it (padding rows already masked)."""
        if self.group is None:
            return torch.logsumexp(logits, dim=-1)
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        total = torch.exp(logits - top.unsqueeze(1)).sum(dim=-1)
        dist.all_reduce(total, group=self.group)
        return top + torch.log(total)

    def local(self, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
        """This rank's [m, width] slice of the logits with the padding rows at -inf, and its first row."""
        if self.group is None:
            return logits[:, : self.size], 0
        first = dist.get_rank(self.group) * logits.shape[1]
        real = min(max(self.size - first, 0), logits.shape[1])
        if real < logits.shape[1]:
            logits = logits.clone()
            logits[:, real:] = -math.inf
        return logits, first


class Read(Protocol):
    """What a forward pass keeps from the log-probabilities of its read rows."""

    def shapes(self, rows: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """The tensors `take` returns for `rows` read rows (what other pipeline stages receive)."""
        ...

    def take(self, logits: torch.Tensor, first: int, vocabulary: Vocabulary) -> tuple[torch.Tensor, ...]:
        """From float32 logits [m, width] (this rank's rows of the output layer) of read rows first..first+m-1."""
        ...


@dataclass(frozen=True)
class Targets:
    """Each read row's log-probabilities of its `tokens` [rows, k] (any token where a slot is unused)."""

    tokens: torch.Tensor

    def shapes(self, rows: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [((rows, self.tokens.shape[1]), torch.float32)]

    def take(self, logits: torch.Tensor, first: int, vocabulary: Vocabulary) -> tuple[torch.Tensor, ...]:
        targets = self.tokens[first : first + len(logits)]
        logits, start = vocabulary.local(logits)
        if vocabulary.group is None:
            return (torch.log_softmax(logits, dim=-1).gather(1, targets),)
        inside = (targets >= start) & (targets < start + logits.shape[1])
        picked = logits.gather(1, (targets - start).clamp(0, logits.shape[1] - 1)).masked_fill(~inside, 0.0)
        dist.all_reduce(picked, group=vocabulary.group)  # one rank holds each target; the others add 0
        return (picked - vocabulary.log_normalizer(logits).unsqueeze(1),)


class Greedy:
    """Each read row's most likely token and its log-probability."""

    def shapes(self, rows: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [((rows,), torch.float32), ((rows,), torch.long)]

    def take(self, logits: torch.Tensor, first: int, vocabulary: Vocabulary) -> tuple[torch.Tensor, ...]:
        logits, start = vocabulary.local(logits)
        if vocabulary.group is None:
            return tuple(torch.log_softmax(logits, dim=-1).max(dim=-1))
        best, token = logits.max(dim=-1)
        size = dist.get_world_size(vocabulary.group)
        bests, tokens = [torch.empty_like(best) for _ in range(size)], [torch.empty_like(token) for _ in range(size)]
        dist.all_gather(bests, best, group=vocabulary.group)
        dist.all_gather(tokens, token + start, group=vocabulary.group)
        # the first rank holding the maximum: the lowest token id, as a max over the whole vocabulary takes
        winner = torch.stack(bests).argmax(dim=0, keepdim=True)
        best = torch.stack(bests).gather(0, winner)[0]
        return best - vocabulary.log_normalizer(logits), torch.stack(tokens).gather(0, winner)[0]


GREEDY = Greedy()


class LocalBackend:
    """Forward passes of a model that is whole on this rank (or whose tensor-parallel group makes the same
    calls). `output_rows`: the output layer runs on at most this many read rows at a time."""

    def __init__(self, model: torch.nn.Module, vocabulary: Vocabulary, output_rows: int, gather_logits: bool):
        self.model = model
        self.vocabulary = Vocabulary(vocabulary.size) if gather_logits else vocabulary
        self.output_rows = output_rows
        self.gather_logits = gather_logits

    @torch.no_grad()
    def __call__(self, tokens, positions, masked, rows, columns, read: Read | None) -> tuple[torch.Tensor, ...]:
        """What `read` takes at the positions (rows[i], columns[i]) of a pass over `tokens` and `positions`
        [b, s]. `masked`: Megatron's attention mask [b, 1, s, s], True where a query must not attend; or, under
        the engine's own attention, the plan of the pass (`attention.Trees`, `attention.Decoding`)."""
        return self.model(
            tokens,
            positions,
            masked,
            runtime_gather_output=self.gather_logits,
            output_processor=self._project(rows, columns, read),
        )

    def _project(self, rows, columns, read: Read | None):
        def project(*, hidden_states, output_layer, output_weight, scale_logits, **_):
            picked = hidden_states[columns, rows].unsqueeze(1)  # hidden_states is [s, b, h]
            parts = []
            for first in range(0, picked.shape[0] if read is not None else 0, self.output_rows):
                logits, _ = output_layer(
                    picked[first : first + self.output_rows],
                    weight=output_weight,
                    runtime_gather_output=self.gather_logits,
                )
                parts.append(read.take(scale_logits(logits)[:, 0].float(), first, self.vocabulary))
            return tuple(torch.cat(values) for values in zip(*parts))

        return project


class ParallelBackend(LocalBackend):
    """Forward passes of this rank's part of a model split by pipeline parallelism (and tensor parallelism
    within each stage): Megatron's parallel state says which stage this rank is and who its neighbours are."""

    def __init__(self, model: torch.nn.Module, vocabulary: Vocabulary, output_rows: int, gather_logits: bool):
        from megatron.core import parallel_state

        super().__init__(model, vocabulary, output_rows, gather_logits)
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.first_stage = parallel_state.is_pipeline_first_stage()
        self.last_stage = parallel_state.is_pipeline_last_stage()
        self.previous = parallel_state.get_pipeline_model_parallel_prev_rank()
        self.next = parallel_state.get_pipeline_model_parallel_next_rank()
        self.last = parallel_state.get_pipeline_model_parallel_last_rank()
        parameter = next(model.parameters())
        self.device = parameter.device
        self.dtype = model.config.pipeline_dtype or parameter.dtype  # what the stages exchange, as in training
        self.hidden_size = model.config.hidden_size

    @torch.no_grad()
    def __call__(self, tokens, positions, masked, rows, columns, read: Read | None) -> tuple[torch.Tensor, ...]:
        if not self.first_stage:
            hidden = torch.empty(
                tokens.shape[1], tokens.shape[0], self.hidden_size, dtype=self.dtype, device=self.device
            )
            dist.recv(hidden, src=self.previous, group=self.group)
            self.model.set_input_tensor(hidden)
        out = super().__call__(tokens, positions, masked, rows, columns, read)
        if not self.first_stage:
            self.model.set_input_tensor(None)
        if not self.last_stage:
            dist.send(out.contiguous(), dst=self.next, group=self.group)
            shapes = read.shapes(len(rows)) if read is not None else []
            out = tuple(torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in shapes)
        for tensor in out:
            dist.broadcast(tensor, src=self.last, group=self.group)
        return out


def backend_for(model: torch.nn.Module, vocab_size: int, output_rows: int, gather_logits: bool = False) -> LocalBackend:
    """The backend for `model` as Megatron's parallel state lays it out on this rank: `ParallelBackend` under
    pipeline parallelism, else `LocalBackend` (over the tensor-parallel group's split vocabulary, if any)."""
    from megatron.core import parallel_state

    group = None
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        group = parallel_state.get_tensor_model_parallel_group()
    vocabulary = Vocabulary(vocab_size, group)
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        return ParallelBackend(model, vocabulary, output_rows, gather_logits)
    return LocalBackend(model, vocabulary, output_rows, gather_logits)
