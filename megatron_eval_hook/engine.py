"""Log-prob scoring and greedy generation on a Megatron `GPTModel`, doing as little work as the answers need.

The engine knows token ids only: HELM's text, stop sequences and tokenizer live in `helm/client.py`.
Three savings apply to every model:

- identical requests are computed once;
- the output layer (hidden x vocabulary, the largest matmul of a small model) runs only at the
  positions whose log-probability or next token is used, through `GPTModel`'s `output_processor`;
- batches are grouped by length.

Two more need the positions to be learned absolute embeddings (GPT-2 style: a token's position
is an input, not its index in the batch) and use the engine's own attention kernel in place of
the model's core attention for the duration of a call (`FastAttention`):

- scoring packs requests into prefix trees: a multiple-choice question shared by its four answers
  is computed once, each token attending only to its own ancestors; a forward pass holds trees one
  after the other with no padding (attention runs tree by tree on CPU, on padded batches of trees
  elsewhere);
- generation keeps a key/value cache, so each new token costs one position, not the whole prefix;
  the prompts' common trunk (the in-context examples) is computed and stored once, and each step
  feeds one token for every request of a group sized by the cache's memory, not by batch_size.

Models with other position encodings (rotary) take the plain path: every request recomputed in
full, with Megatron's own attention. Both paths give the same numbers up to float rounding.

On CPU, both paths run the model's float32 linear layers through oneDNN's kernel (`OneDnnLinear`, with
weights reordered once into its blocked layout) rather than PyTorch's default MKL call, about twice as
fast on AMD processors; a GELU MLP's first matmul also adds its bias and applies the GELU.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_eval_hook.allocator import keep_freed_memory

# finish reasons, as HELM's clients report them
STOP, LENGTH, END_OF_TEXT = "stop", "length", "endoftext"

# Scoring packs requests into prefix trees of at most 1 to 4 times this many tokens (more when one
# request is longer), generation the parts of its prompts after their common trunk. Attention over a
# tree is dense: larger trees share more prefixes but pay for attention between positions that cannot
# see each other. A forward pass holds up to batch_size x ROW_TOKENS positions (on CPU, CPU_PASS_POSITIONS).
ROW_TOKENS = 256

# A generation group's key/value cache holds at most this many batches (batch_size x row_tokens
# positions each). GPT-2 small in float32, batch_size 16: 32768 positions, 2.4 GB.
CACHE_BATCHES = 8

# A decoding step costs about as much as computing this many prompt positions, however few requests it
# feeds (on CPU, mostly one read of the weights): what a request decoded apart from a group costs it.
STEP_POSITIONS = 32

# On CPU a packed forward pass holds at most this many positions: past it the MLP's [positions, 4 x hidden]
# activations outgrow the last-level cache and the matmuls slow down (GPT-2 small through oneDNN on a 32 MiB
# L3: ~430 GFLOP/s per layer at 512-2048 positions, ~380 at 4096).
CPU_PASS_POSITIONS = 2048

# The output layer runs on at most this many bytes of float32 logits at a time, each slice normalized and
# read at once: on CPU, while they are in the last-level cache (GPT-2's 50k vocabulary: 125 rows, 24 MiB;
# a [2048, 50k] block at once is 400 MiB, written and read back from memory); on GPU it bounds the memory.
OUTPUT_BYTES_CPU, OUTPUT_BYTES_GPU = 24 << 20, 1 << 30

# A padded batch of prefix trees (attention off the CPU) holds at most this many bytes of keys and values
# (the trunk's copied for every tree) and attention bias, one tree at least: a 7B model's 8k-token trunk is
# 128 MiB of keys and values per tree and layer in bf16.
PADDED_BATCH_BYTES = 256 << 20


class RequestTooLong(ValueError):
    """A request does not fit in the model's context window."""


@dataclass(frozen=True)
class Generation:
    """Generated token ids, their log-probabilities (natural log) and why generation ended."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass
class GenerationRequest:
    """Greedy continuation of `prompt` for at most `max_new_tokens` tokens.

    `is_done(tokens)` is asked after each new token, with all tokens generated so far, and ends
    generation when it returns True (a stop sequence appeared).
    """

    prompt: list[int]
    max_new_tokens: int
    is_done: Callable[[list[int]], bool] | None = None


def fast_path_unsupported(model: torch.nn.Module) -> str | None:
    """Why the prefix-tree and key/value-cache paths cannot run on `model`; None when they can."""
    from megatron.core.transformer.attention import SelfAttention

    config = model.config
    if getattr(model, "position_embedding_type", None) != "learned_absolute":
        return f"position_embedding_type={getattr(model, 'position_embedding_type', None)!r}"
    for name, unsupported in (
        ("multi_latent_attention", bool(getattr(config, "multi_latent_attention", False))),
        ("softmax_type", getattr(config, "softmax_type", "vanilla") != "vanilla"),
        ("window_size", getattr(config, "window_size", None) is not None),
        ("tensor_model_parallel_size", config.tensor_model_parallel_size > 1),
        ("context_parallel_size", config.context_parallel_size > 1),
    ):
        if unsupported:
            return f"{name}={getattr(config, name)!r}"
    if not any(isinstance(m, SelfAttention) for m in model.modules()):
        return "no self-attention layers"
    return None


class OneDnnLinear:
    """oneDNN's linear (matmul plus bias) for float32 CPU tensors, each weight reordered into the kernel's
    blocked layout once and kept while the weight is the same tensor, unchanged (its storage and version).

    PyTorch runs a float32 CPU matmul through MKL, which on AMD processors runs at about half the speed
    of oneDNN's kernels (bench/throughput.py measures both side by side). Both compute in float32; only
    the order of the sums differs. The reordered weights (one more copy of the model's linear layers)
    are what oneDNN would otherwise make at every call: measured on GPT-2 small's shapes, 16 rows 222 ->
    392 GFLOP/s, 100 rows 438 -> 501, 2048 rows 444 -> 482, with bit-identical results. `release` frees
    them."""

    PACKED_FOR_ROWS = 2048  # the rows the blocked layout is chosen for; as fast at 16 to 2048 rows

    def __init__(self, op: Callable, reorder: Callable | None):
        self._op, self._reorder = op, reorder
        self._packed: dict[int, tuple[tuple[int, int], torch.Tensor, torch.Tensor]] = {}

    def __call__(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: str | None = None
    ) -> torch.Tensor:
        """input x weight^T + bias; with `gelu` ("erf" or "tanh", its approximation), GELU of that, applied
        by the kernel as it writes the output instead of as two more passes over it."""
        # oneDNN's post-op and its algorithm: the exact GELU is its "none"
        post, algorithm = ("none", "") if gelu is None else ("gelu", "none" if gelu == "erf" else "tanh")
        return self._op(input, self._pack(weight), bias, post, [], algorithm)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        if self._reorder is None:
            return weight
        stamp = (weight.data_ptr(), weight._version)
        entry = self._packed.get(id(weight))
        if entry is None or entry[0] != stamp or entry[2] is not weight:
            entry = (stamp, self._reorder(weight.detach(), self.PACKED_FOR_ROWS), weight)
            self._packed[id(weight)] = entry
        return entry[1]

    def release(self) -> None:
        self._packed.clear()


def onednn_linear(pack: bool = True) -> OneDnnLinear | None:
    """oneDNN's float32 linear (`OneDnnLinear`; `pack=False`: without reordered weights), or None where
    this torch build lacks it."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        probe = op(torch.ones(2, 1, 3), torch.ones(4, 3), torch.ones(4), "none", [], "")
    except (AttributeError, RuntimeError):
        return None
    if not torch.equal(probe, torch.full((2, 1, 4), 4.0)):
        return None
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if pack else None
    if reorder is not None:
        try:
            packed = op(torch.ones(2, 1, 3), reorder(torch.ones(4, 3), 2), torch.ones(4), "none", [], "")
        except RuntimeError:
            reorder = None
        else:
            reorder = reorder if torch.equal(packed, probe) else None
    return OneDnnLinear(op, reorder)


class FastAttention(torch.nn.Module):
    """Core attention for the engine's forward passes, in place of a layer's own.

    Takes Megatron's core-attention arguments: query [sq, b, heads, d], key and value
    [sk, b, groups, d] (positions already applied); the masks are the engine's, set between
    forward passes with the kind of call:

    - trees (`rows` or `padded` set): the call's positions are one sequence (b = 1) holding prefix
      trees one after the other, with no padding for the layer's matmuls to compute. Each node sees
      every position of `trunk` when one is set, then itself and its ancestors. With `rows` (each
      tree's first position and mask) attention runs tree by tree, computing no padding: the CPU's
      choice. With `padded` it runs on batches of trees of similar sizes, gathered into padded rows:
      a few kernel calls per layer instead of a few per tree, for a GPU, where launches cost more
      than the padding's arithmetic. With `keep`, the call's keys and values stay in `fresh` for the
      engine to cache.
    - decoding (`padding` set): batch row i is row i of `cache`, feeding one token. The cache holds
      each request's prompt part (after the trunk), padded to a common width, and apart from it its
      generated tokens: every row writes its new key and value at the same `step`, and attends to
      the trunk, its prompt part except the padding, and its generated tokens up to there. The
      engine advances `step` between steps. (Apart, the prompt parts are read whole, as one block
      of memory: the NarrativeQA bench call's decoding matmuls took 4.87 s, 5.48 s as slices of rows
      holding both.)
    """

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.trunk: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values [groups, t, d]
        self.keep = False
        self.rows: list[tuple[int, torch.Tensor]] | None = None  # first position, [1, 1, n, t + n] True: sees
        # in place of `rows`: the trees in padded batches of similar sizes, and each position's place in their outputs
        self.padded: tuple[list[_TreeBatch], torch.Tensor] | None = None
        self.fresh: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values [positions, groups, d]
        # prompt keys, values [rows, groups, width, d]; generated keys, values [rows, groups, steps, d]
        self.cache: tuple[torch.Tensor, ...] | None = None
        self.padding: torch.Tensor | None = None  # [rows, 1, 1, width] True where a prompt part has no key
        self.step = 0

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, **_):
        if attention_bias is not None:
            raise ValueError("attention bias is not supported by the evaluation engine's attention")
        if self.padding is not None:
            return self._decode(query, key, value)
        positions, _, heads, dim = query.shape
        query, key, value = query[:, 0], key[:, 0], value[:, 0]  # [positions, heads or groups, d]
        if self.keep:
            self.fresh = key, value
        if self.padded is not None:
            return self._attend_padded(query, key, value).view(positions, 1, heads * dim)
        shared = 0
        if self.trunk is not None:  # each tree's keys go after the trunk's, copied there once per call
            shared = self.trunk[0].shape[1]
            longest = max(allowed.shape[-2] for _, allowed in self.rows)
            buffers = [part.new_empty(1, part.shape[0], shared + longest, dim) for part in self.trunk]
            for buffer, part in zip(buffers, self.trunk):
                buffer[0, :, :shared] = part
        outs = []
        for first, allowed in self.rows:
            length = allowed.shape[-2]
            q, k, v = (t[first : first + length].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
            if shared:
                for buffer, part in zip(buffers, (k, v)):
                    buffer[:, :, shared : shared + length] = part
                k, v = (buffer[:, :, : shared + length] for buffer in buffers)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=self.scale, enable_gqa=k.shape[1] != heads
            )
            outs.append(out[0].transpose(0, 1))  # [length, heads, d]
        return torch.cat(outs).view(positions, 1, heads * dim)

    def _attend_padded(self, query, key, value):
        """One attention call per batch of trees: each tree gathered into a row of [trees, longest], its keys
        after the trunk's, the padding masked by the batch's bias; the outputs go back to the pass's positions."""
        batches, scatter = self.padded
        outs = []
        for batch in batches:
            trees, length = batch.gather.shape
            q, k, v = (t[batch.gather].transpose(1, 2) for t in (query, key, value))  # [trees, heads or groups, n, d]
            if self.trunk is not None:
                k, v = (
                    torch.cat([part.expand(trees, *part.shape), own], dim=2) for part, own in zip(self.trunk, (k, v))
                )
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=batch.bias, scale=self.scale, enable_gqa=k.shape[1] != q.shape[1]
            )
            outs.append(out.transpose(1, 2).reshape(trees * length, -1))
        return (outs[0] if len(outs) == 1 else torch.cat(outs))[scatter]

    def _decode(self, query, key, value):
        """One new token per cache row. The trunk's keys are stored once, not per row, so its scores are
        a matmul of their own; the trunk, the prompt parts and the generated tokens share one softmax
        (scores in float32, as eager attention)."""
        prompt_keys, prompt_values, new_keys, new_values = self.cache
        rows, groups, width, dim = prompt_keys.shape
        heads = query.shape[2]
        new_keys[:, :, self.step] = key[0]
        new_values[:, :, self.step] = value[0]
        new_keys, new_values = new_keys[:, :, : self.step + 1], new_values[:, :, : self.step + 1]
        # the scale is applied to the query: exact when it is a power of two (1/8 for 64-wide heads)
        query = (query[0] * self.scale).reshape(rows, groups, heads // groups, dim)
        # [rows, groups, heads/groups, keys] as keys x query: the sums of query x keys^T, faster batched
        by_key = query.transpose(-1, -2)
        prompt_scores = torch.matmul(prompt_keys, by_key).transpose(-1, -2).masked_fill_(self.padding, -math.inf)
        parts = [prompt_scores, torch.matmul(new_keys, by_key).transpose(-1, -2)]
        shared = 0
        if self.trunk is not None:
            trunk_keys, trunk_values = self.trunk
            shared = trunk_keys.shape[1]
            by_group = query.permute(1, 0, 2, 3).reshape(groups, -1, dim)  # [groups, rows * heads/groups, d]
            trunk_scores = torch.matmul(by_group, trunk_keys.transpose(-1, -2))
            parts.insert(0, trunk_scores.view(groups, rows, -1, shared).permute(1, 0, 2, 3))
        scores = torch.cat([part.float() for part in parts], dim=-1)
        weights = torch.softmax(scores, dim=-1).to(prompt_values.dtype)
        prompt_end = shared + width
        out = torch.matmul(weights[..., shared:prompt_end], prompt_values)  # [rows, groups, heads/groups, d]
        out += torch.matmul(weights[..., prompt_end:], new_values)
        if shared:
            by_group = weights[..., :shared].permute(1, 0, 2, 3).reshape(groups, -1, shared)
            out += torch.matmul(by_group, trunk_values).view(groups, rows, -1, dim).permute(1, 0, 2, 3)
        return out.reshape(1, rows, heads * dim)


@dataclass(frozen=True)
class _TreeBatch:
    """Trees of similar sizes padded to one length, attended in one call (`FastAttention._attend_padded`)."""

    gather: torch.Tensor  # [trees, longest]: the pass position of each tree's node (0 in the padding)
    bias: torch.Tensor  # [trees, 1, longest, trunk + longest]: 0 where a node sees a key, -inf elsewhere


@dataclass
class _PackedRow:
    """Requests sharing a prefix, as a tree of token positions: one row of a packed forward pass."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # node index, -1 for a root
    depths: list[int] = field(default_factory=list)  # position id
    paths: dict[int, list[int]] = field(default_factory=dict)  # request index -> its nodes

    def add(self, token: int, parent: int) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1 if parent >= 0 else 0)
        return len(self.tokens) - 1

    def visible(self) -> np.ndarray:
        """[n, n] bool: node i may attend to node j (j is i or an ancestor of i)."""
        n = len(self.tokens)
        allowed = np.zeros((n, n), dtype=bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                allowed[i] = allowed[parent]
            allowed[i, i] = True
        return allowed


@dataclass
class _Group:
    """Requests decoded together, with what sizes their cache: the length of their common trunk (leaving
    each prompt a token of its own), of the longest prompt and of the longest generation."""

    members: list[int]
    trunk: int
    longest: int
    new_tokens: int


@dataclass
class _Trunk:
    """A decoding group's common trunk and, per layer, its keys and values ([groups, t, d] each)."""

    tokens: list[int] = field(default_factory=list)
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _common_trunk(prompts: Sequence[Sequence[int]]) -> Sequence[int]:
    """The longest prefix of every prompt that leaves each of them at least one token of its own."""
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    length = min(shortest - 1, min(_common_prefix(first, p) for p in prompts))
    return first[: max(length, 0)]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _parts(shared: Sequence[int], start: int, end: int, depth: int) -> list[tuple[int, int]]:
    """The runs of sequences start..end-1 (lexicographic order, `shared[i]`: prefix shared with sequence
    i-1) that share more than `depth` tokens: the children of their common node at that depth."""
    cuts = [start] + [i for i in range(start + 1, end) if shared[i] == depth] + [end]
    return list(zip(cuts, cuts[1:]))


def _trees(lengths: Sequence[int], shared: Sequence[int], limit: int) -> list[tuple[int, int, int]]:
    """Sequences in lexicographic order (`lengths`, `shared[i]`: prefix shared with sequence i-1) cut into
    runs whose prefix tree has at most `limit` nodes: (start, end, nodes). A run over the limit is split
    where its sequences part (the children of the deepest node they all share), each child recursively."""
    after = [0]  # after[i]: nodes of sequences 0..i-1 beyond what each shares with the one before
    for length, common in zip(lengths, shared):
        after.append(after[-1] + length - common)
    runs, pending = [], [(0, len(lengths))]
    while pending:
        start, end = pending.pop()
        nodes = lengths[start] + after[end] - after[start + 1]
        if nodes <= limit or end - start == 1:
            runs.append((start, end, nodes))
            continue
        pending.extend(reversed(_parts(shared, start, end, min(shared[start + 1 : end]))))
    return runs


def _trunk_classes(order: list[int], prompts: list[list[int]], wanted: list[int]) -> list[list[int]]:
    """`order` (lexicographic) cut into runs decoded apart, each sharing a longer trunk.

    A run of n prompts whose common trunk is m tokens long computes about sum(lengths) - (n - 1) x m
    positions. Cut where its prompts part (its children: the runs that share more than m), it computes
    sum over children of (n_j - 1) x (t_j - m) fewer, but each child after the first pays its decoding
    steps again (`STEP_POSITIONS` each; the m tokens it reuses from the child before). HELM fitting a long
    passage by dropping an in-context example makes such a child: one prompt that shares only part of
    everyone's examples."""
    shared = [0] + [_common_prefix(prompts[a], prompts[b]) for a, b in zip(order, order[1:])]

    def trunk(start: int, end: int) -> int:
        shortest = min(len(prompts[order[i]]) for i in range(start, end))
        return min([shortest - 1, *shared[start + 1 : end]])

    classes, pending = [], [(0, len(order))]
    while pending:
        start, end = pending.pop()
        if end - start > 1:
            common = trunk(start, end)
            children = _parts(shared, start, end, common)
            if len(children) > 1:
                gained = sum((b - a - 1) * (trunk(a, b) - common) for a, b in children)
                steps = max(wanted[order[i]] for i in range(start, end))
                if gained > (len(children) - 1) * STEP_POSITIONS * steps:
                    pending.extend(reversed(children))
                    continue
        classes.append([order[i] for i in range(start, end)])
    return classes


class Engine:
    """Evaluation forward passes on a (single-rank, TP=PP=1) Megatron `GPTModel`.

    `vocab_size` is the tokenizer's vocabulary: the model's padded vocabulary rows beyond it
    are never predicted. `max_sequence_length` is the context window, in tokens. `batch_size`
    is the number of sequences per forward pass (generation, plain scoring), or of `row_tokens`
    positions (packed scoring and prompts). `padded_trees`: attention over a pass's prefix trees
    on padded batches of trees (`FastAttention`); by default off on CPU, on elsewhere.

    On CPU the engine keeps a reordered copy of the model's float32 linear weights between calls
    (`OneDnnLinear`), made again for a weight whose tensor or version changed; `release()` frees it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        vocab_size: int,
        max_sequence_length: int,
        batch_size: int,
        end_of_text: int | None = None,
        fast: bool = True,
        row_tokens: int = ROW_TOKENS,
        padded_trees: bool | None = None,
    ):
        self.model = model
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.batch_size = batch_size
        self.end_of_text = end_of_text
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory()
        self.plain_reason = fast_path_unsupported(model) if fast else "fast=False"
        self.row_tokens = row_tokens
        dtype = next(model.parameters()).dtype
        self.linear = onednn_linear() if self.device.type == "cpu" and dtype == torch.float32 else None
        # attention over a pass's trees: on CPU tree by tree (no work on padding), elsewhere on padded batches
        # of trees: a few kernel calls per layer, where a call per tree costs more in launches than in arithmetic
        self.padded_trees = self.device.type != "cpu" if padded_trees is None else padded_trees
        self.pass_positions = batch_size * row_tokens
        if self.device.type == "cpu":
            self.pass_positions = min(self.pass_positions, CPU_PASS_POSITIONS)
        output_bytes = OUTPUT_BYTES_CPU if self.device.type == "cpu" else OUTPUT_BYTES_GPU
        self.output_rows = max(1, output_bytes // (4 * vocab_size))

    def release(self) -> None:
        """Free what the engine keeps between calls (on CPU, the reordered linear weights)."""
        if self.linear is not None:
            self.linear.release()

    # -- forward passes ----------------------------------------------------------------------

    @torch.no_grad()
    def _forward(self, tokens, positions, masked, rows, columns, read) -> tuple[torch.Tensor, ...]:
        """What `read` takes from the log-probabilities over the real vocabulary at (rows[i], columns[i])
        only: `read(logprobs [m, vocab], first)` is called on slices of `output_rows` positions (`first`:
        the slice's first i) and returns a tuple of tensors of m rows each, concatenated over the slices.

        `masked` [b, 1, sq, sk] is True where a query must not attend (Megatron's attention); None under
        `FastAttention`, which takes its masks from the engine.
        """

        def project(*, hidden_states, output_layer, output_weight, scale_logits, **_):
            picked = hidden_states[columns, rows].unsqueeze(1)  # hidden_states is [s, b, h]
            parts = []
            for first in range(0, picked.shape[0], self.output_rows):
                logits, _ = output_layer(
                    picked[first : first + self.output_rows], weight=output_weight, runtime_gather_output=True
                )
                logits = scale_logits(logits)[:, 0, : self.vocab_size].float()
                parts.append(read(torch.log_softmax(logits, dim=-1), first))
            return tuple(torch.cat(values) for values in zip(*parts))

        return self.model(tokens, positions, masked, runtime_gather_output=True, output_processor=project)

    @contextmanager
    def _fast_linears(self) -> Iterator[None]:
        """Run the model's linear layers through `self.linear` (oneDNN on CPU) for the duration of the block,
        with a GELU MLP's bias and activation in its first matmul (`_fused_mlp`)."""
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        if self.linear is None:
            yield
            return
        linear = self.linear
        layers = [m for m in self.model.modules() if type(m) in (ColumnParallelLinear, RowParallelLinear)]
        mlps = [(m, gelu) for m in self.model.modules() if (gelu := _fusable_gelu(m)) is not None]
        # an instance attribute shadows the class's method; deleting it restores that
        for layer in layers:
            layer._forward_impl = lambda input, weight, bias=None, **_: linear(input, weight, bias)
        for mlp, gelu in mlps:
            mlp.forward = functools.partial(_fused_mlp, mlp, linear, gelu)
        try:
            yield
        finally:
            for layer in layers:
                del layer._forward_impl
            for mlp, _ in mlps:
                del mlp.forward

    @contextmanager
    def _fast_attention(self) -> Iterator[list[FastAttention]]:
        """Swap every layer's core attention for a `FastAttention` for the duration of the block."""
        from megatron.core.transformer.attention import SelfAttention

        attentions = [m for m in self.model.modules() if isinstance(m, SelfAttention)]
        originals = [m.core_attention for m in attentions]
        config = self.model.config
        scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        swapped = [FastAttention(scale) for _ in attentions]
        for module, fast in zip(attentions, swapped):
            module.core_attention = fast
        try:
            yield swapped
        finally:
            for module, original in zip(attentions, originals):
                module.core_attention = original

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.as_tensor(values, dtype=dtype).to(self.device)

    def _padded(self, rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return batch.to(self.device)

    def _causal(self, length: int) -> torch.Tensor:
        return torch.triu(torch.ones(length, length, dtype=torch.bool, device=self.device), 1).view(
            1, 1, length, length
        )

    # -- scoring -----------------------------------------------------------------------------

    def score(self, sequences: Sequence[Sequence[int]], needed_from: Sequence[int] | None = None) -> list[list[float]]:
        """log p(token_i | tokens_<i) for every token of every sequence; the first token gets 0.0.

        `needed_from[k]`: only tokens at index >= needed_from[k] of sequence k are computed; the
        others get 0.0 (HELM reads only an answer's own tokens from a multiple-choice request).
        """
        for sequence in sequences:
            if len(sequence) > self.max_sequence_length:
                raise RequestTooLong(
                    f"a scoring request of {len(sequence)} tokens exceeds the context window of "
                    f"{self.max_sequence_length} tokens"
                )
        starts = list(needed_from) if needed_from is not None else [1] * len(sequences)
        unique: dict[tuple[int, ...], int] = {}  # identical requests: computed once, from the earliest start
        for sequence, start in zip(sequences, starts):
            key = tuple(sequence)
            unique[key] = min(unique.get(key, len(key)), max(start, 1))
        by_key = {s: [0.0] * len(s) for s in unique}
        distinct = [s for s in unique if unique[s] < len(s)]  # the others need no forward pass
        if distinct:
            wanted = [range(unique[s], len(s)) for s in distinct]
            run = self._score_packed if self.plain_reason is None else self._score_plain
            with self._fast_linears():
                by_key.update(zip(distinct, run(distinct, wanted)))
        return [list(by_key[tuple(s)]) for s in sequences]

    def _scores(self, sequences, picks, count: int, forward: Callable) -> list[list[float]]:
        """log p(token i of sequence k) for each pick (k, i, r), read from row r of the `count` rows of
        log-probabilities `forward(read)` computes (`_forward`'s `read`); 0.0 at the tokens not picked.
        Several picks may read one row: the answers of a question all start after its last token."""
        slots = [0] * count  # picks of each row so far
        where = []  # each pick's (row, slot)
        for _, _, r in picks:
            where.append((r, slots[r]))
            slots[r] += 1
        targets = np.zeros((count, max(slots, default=1)), dtype=np.int64)
        at = tuple(np.array(where, dtype=np.int64).reshape(-1, 2).T)
        targets[at] = [sequences[k][i] for k, i, _ in picks]
        targets = self._tensor(targets)
        (values,) = forward(lambda logprobs, first: (logprobs.gather(1, targets[first : first + len(logprobs)]),))
        values = values.cpu().numpy()[at].tolist()
        results = [[0.0] * len(s) for s in sequences]
        for (k, i, _), value in zip(picks, values):
            results[k][i] = value
        return results

    def _score_plain(self, sequences, wanted) -> list[list[float]]:
        results: list[list[float]] = [[] for _ in sequences]
        order = sorted(range(len(sequences)), key=lambda k: -len(sequences[k]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(sequences[k]) for k in batch)
            picks, rows, columns = [], [], []
            for row, k in enumerate(batch):
                for i in wanted[k]:
                    picks.append((row, i, len(rows)))
                    rows.append(row)
                    columns.append(i - 1)  # the logits at position i-1 predict token i
            forward = functools.partial(
                self._forward,
                self._padded([sequences[k] for k in batch], width),
                self._tensor(range(width)).unsqueeze(0).expand(len(batch), width),
                self._causal(width),
                self._tensor(rows),
                self._tensor(columns),
            )
            scores = self._scores([sequences[k] for k in batch], picks, len(rows), forward)
            for row, k in enumerate(batch):
                results[k] = scores[row]
        return results

    def _pack(self, sequences: Sequence[Sequence[int]], trunk: int = 0) -> list[_PackedRow]:
        """Prefix trees holding every sequence once, largest first, for the least estimated work.

        Sequences sharing a prefix (a question's answer choices, several questions on one passage) go in
        one tree, each token attending only to its own ancestors. Attention runs over a tree as a whole
        (each node against every node), so a tree over a limit of nodes is split where its sequences
        part, the shared part computed once per piece. Which limit is best depends on the trees: the
        limits tried are 1 to 4 x row_tokens, priced by `_work` (`trunk`: keys every position also
        attends to)."""
        order = sorted(range(len(sequences)), key=lambda k: tuple(sequences[k]))
        lengths = [len(sequences[k]) for k in order]
        shared = [0] + [_common_prefix(sequences[a], sequences[b]) for a, b in zip(order, order[1:])]
        trees = min(
            (_trees(lengths, shared, self.row_tokens * m) for m in (1, 2, 3, 4)),
            key=lambda runs: self._work([nodes for _, _, nodes in runs], trunk),
        )
        rows = []
        for start, end, _ in trees:
            row, path = _PackedRow(), []
            for i in range(start, end):  # lexicographic: each shares most with the one before
                k = order[i]
                path = path[: shared[i]] if i > start else []
                for token in sequences[k][len(path) :]:
                    path.append(row.add(token, path[-1] if path else -1))
                row.paths[k] = path
            rows.append(row)
        return sorted(rows, key=lambda r: -len(r.tokens))

    def _packed_forward(
        self, layers: list[FastAttention], rows: Sequence[_PackedRow], picks, read=None, first_position=0
    ):
        """One forward pass over prefix trees laid one after the other, with no padding: what `read` takes
        (see `_forward`) from the log-probabilities at `picks` [(row, node)]. The trees follow
        `first_position` positions every node sees (the layers' trunk); their position ids start there.
        Returns that and the offset of each row's first node in the pass."""
        offsets = list(itertools.accumulate((len(row.tokens) for row in rows[:-1]), initial=0))
        if self.padded_trees:
            padded = self._tree_batches(rows, offsets, first_position)
            for layer in layers:
                layer.padded = padded
        else:
            masks = []
            for first, row in zip(offsets, rows):
                seen = np.concatenate([np.ones((len(row.tokens), first_position), dtype=bool), row.visible()], axis=1)
                masks.append((first, torch.from_numpy(seen)[None, None].to(self.device)))
            for layer in layers:
                layer.rows = masks
        read_picks = self._forward(
            self._tensor([t for row in rows for t in row.tokens]).unsqueeze(0),
            self._tensor([first_position + d for row in rows for d in row.depths]).unsqueeze(0),
            None,
            self._tensor([0] * len(picks)),
            self._tensor([offsets[r] + node for r, node in picks]),
            read,
        )
        for layer in layers:
            layer.rows = layer.padded = None
        return read_picks, offsets

    def _tree_batches(
        self, rows: Sequence[_PackedRow], offsets: list[int], shared: int
    ) -> tuple[list[_TreeBatch], torch.Tensor]:
        """`rows` laid out at `offsets` as padded batches of trees, each node seeing the `shared` keys of the
        trunk first, and each pass position's place in the batches' flattened outputs, one after the other.

        Largest first, a tree under half the size of its batch's first starts a new batch: the padding stays
        under 3/4 of a batch's area (the bias's memory within 4 x the attention's real work). So does a tree
        past PADDED_BATCH_BYTES. A padding query sees only its own (padding) key: its output is finite, and
        dropped."""
        config = self.model.config
        dtype = next(self.model.parameters()).dtype
        key_value = 2 * (config.num_query_groups or config.num_attention_heads) * config.kv_channels
        groups: list[list[int]] = []
        longest = capacity = 0  # the current batch's first (largest) tree, and how many trees it may hold
        for r in sorted(range(len(rows)), key=lambda r: -len(rows[r].tokens)):
            n = len(rows[r].tokens)
            if 2 * n < longest or not groups or len(groups[-1]) == capacity:
                groups.append([])
                longest = n
                capacity = max(1, PADDED_BATCH_BYTES // ((shared + n) * (key_value + n) * dtype.itemsize))
            groups[-1].append(r)
        scatter = np.empty(offsets[-1] + len(rows[-1].tokens), dtype=np.int64)
        batches, placed = [], 0
        for group in groups:
            longest = len(rows[group[0]].tokens)
            gather = np.zeros((len(group), longest), dtype=np.int64)
            seen = np.zeros((len(group), longest, longest), dtype=bool)
            for b, r in enumerate(group):
                n, first = len(rows[r].tokens), offsets[r]
                gather[b, :n] = np.arange(first, first + n)
                scatter[first : first + n] = np.arange(placed + b * longest, placed + b * longest + n)
                seen[b, :n, :n] = rows[r].visible()
                seen[b, np.arange(n, longest), np.arange(n, longest)] = True
            placed += len(group) * longest
            # the bias's rows start at multiples of 16 elements, as memory-efficient attention kernels require
            width = -(-(shared + longest) // 16) * 16
            bias = torch.zeros(len(group), 1, longest, width, dtype=dtype, device=self.device)[..., : shared + longest]
            bias[:, 0, :, shared:].masked_fill_(~torch.from_numpy(seen).to(self.device), -math.inf)
            batches.append(_TreeBatch(self._tensor(gather), bias))
        return batches, self._tensor(scatter)

    def _work(self, sizes: list[int], trunk: int) -> float:
        """Estimated cost of forward passes over trees of these sizes, in units of one attention key: per
        position, a layer's matmuls cost 24 x hidden^2 FLOPs and each key it attends to 4 x hidden, so a
        position costs 6 x hidden + its keys (the trunk and its tree)."""
        return sum(size * (6 * self.model.config.hidden_size + trunk + size) for size in sizes)

    def _batches(self, rows: list[_PackedRow]) -> list[list[_PackedRow]]:
        """Rows (largest first) in as few forward passes of at most `pass_positions` (batch_size x
        row_tokens, on CPU at most CPU_PASS_POSITIONS) as this finds, of even sizes: each row goes to the
        emptiest pass, or a new one where it does not fit (a row larger than a pass takes one of its own).
        Passes of even sizes keep every matmul large."""
        limit = self.pass_positions
        count = math.ceil(sum(min(len(row.tokens), limit) for row in rows) / limit)
        passes: list[tuple[int, int]] = [(0, i) for i in range(count)]  # (positions, pass) heap
        batches: list[list[_PackedRow]] = [[] for _ in range(count)]
        for row in rows:
            positions, i = passes[0]
            if positions and positions + len(row.tokens) > limit:  # no room in any pass
                batches.append([row])
                heapq.heappush(passes, (len(row.tokens), len(batches) - 1))
            else:
                batches[i].append(row)
                heapq.heapreplace(passes, (positions + len(row.tokens), i))
        return batches

    def _score_packed(self, sequences, wanted) -> list[list[float]]:
        results: list[list[float]] = [[] for _ in sequences]
        rows = self._pack([s[:-1] for s in sequences])  # a sequence's last token predicts nothing that is read
        with self._fast_attention() as layers:
            for batch in self._batches(rows):
                members, picks = [], []
                picked: dict[tuple[int, int], int] = {}  # (row, node) -> logits row
                for r, row in enumerate(batch):
                    for k, path in row.paths.items():
                        local = len(members)
                        members.append(k)
                        for i in wanted[k]:
                            node = path[i - 1]  # the logits after token i-1 predict token i
                            picks.append((local, i, picked.setdefault((r, node), len(picked))))
                forward = functools.partial(self._packed_forward, layers, batch, list(picked))
                scores = self._scores(
                    [sequences[k] for k in members], picks, len(picked), lambda read, forward=forward: forward(read)[0]
                )
                for local, k in enumerate(members):
                    results[k] = scores[local]
        return results

    # -- generation --------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Greedy generation for every request, batched; see `GenerationRequest`."""
        for request in requests:
            if request.max_new_tokens >= self.max_sequence_length:
                raise RequestTooLong(
                    f"max_tokens={request.max_new_tokens} leaves no room for a prompt in a context window "
                    f"of {self.max_sequence_length} tokens"
                )
        prompts = [self._fit_prompt(r) for r in requests]
        results: list[Generation | None] = [None] * len(requests)
        if self.plain_reason is None:
            # in lexicographic order, prompts sharing a prefix (the same in-context examples) are neighbours
            order = sorted(range(len(prompts)), key=lambda i: prompts[i])
            groups, last_trunk = self._decoding_groups(order, prompts, requests), _Trunk()
            run = functools.partial(self._generate_cached, last_trunk=last_trunk)
        else:  # neighbours have similar lengths
            run, order = self._generate_plain, sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
            groups = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        with self._fast_linears():
            for group in groups:
                for i, generation in zip(group, run([prompts[i] for i in group], [requests[i] for i in group])):
                    results[i] = generation
        return [r for r in results if r is not None]

    def _fit_prompt(self, request: GenerationRequest) -> list[int]:
        # Keep the end of a prompt that would leave too little room (HELM normally fits it first).
        room = self.max_sequence_length - max(request.max_new_tokens, 0)
        return list(request.prompt[-room:]) if len(request.prompt) > room else list(request.prompt)

    def _decoding_groups(self, order: list[int], prompts: list[list[int]], requests) -> list[list[int]]:
        """Runs of `order` decoded together: prompts that share a trunk (`_trunk_classes`), as many at a
        time as keep the group's key/value cache within `CACHE_BATCHES * batch_size * row_tokens`
        positions.

        A group caches its common trunk once, and per request the longest prompt part after the trunk
        plus the most new tokens. Each decoding step feeds one token per request: the more requests per
        step, the more of the step's weight traffic each token shares."""
        budget = CACHE_BATCHES * self.batch_size * self.row_tokens
        groups: list[_Group] = []
        for members in _trunk_classes(order, prompts, [r.max_new_tokens for r in requests]):
            group = None
            for i in members:
                prompt, wanted = prompts[i], requests[i].max_new_tokens
                if group is not None:
                    trunk = min(group.trunk, _common_prefix(prompts[group.members[0]], prompt), len(prompt) - 1)
                    longest, new_tokens = max(group.longest, len(prompt)), max(group.new_tokens, wanted)
                    if trunk + (len(group.members) + 1) * (longest - trunk + new_tokens) <= budget:
                        group.members.append(i)
                        group.trunk, group.longest, group.new_tokens = trunk, longest, new_tokens
                        continue
                group = _Group([i], trunk=len(prompt) - 1, longest=len(prompt), new_tokens=wanted)
                groups.append(group)
        return [group.members for group in groups]

    def _generate_plain(self, prompts: list[list[int]], requests: list[GenerationRequest]) -> list[Generation]:
        state = _Greedy(requests, self.end_of_text)
        tokens = [list(p) for p in prompts]
        while state.live:
            live = state.live
            width = max(len(tokens[i]) for i in live)
            best = self._forward(
                self._padded([tokens[i] for i in live], width),
                self._tensor(range(width)).unsqueeze(0).expand(len(live), width),
                self._causal(width),
                self._tensor(range(len(live))),
                self._tensor([len(tokens[i]) - 1 for i in live]),
                _most_likely,
            )
            for i, token in zip(live, state.step(live, *best)):
                if token is not None:
                    tokens[i].append(token)
        return state.results()

    def _generate_cached(
        self, prompts: list[list[int]], requests: list[GenerationRequest], last_trunk: _Trunk
    ) -> list[Generation]:
        """Prompts decoded together with a key/value cache.

        The prompts' common trunk (HELM's in-context examples, the same at the start of every prompt) is
        computed once and its keys and values kept once, seen by every request (`_set_trunk`). The rest
        of each prompt is computed packed into prefix trees (`_prefill`) and copied into the request's own
        cache row. Then each step feeds every request's last token at once, one position each."""
        state = _Greedy(requests, self.end_of_text)
        if not state.live:
            return state.results()
        trunk = len(_common_trunk(prompts))
        own = [p[trunk:] for p in prompts]
        with self._fast_attention() as layers:
            if trunk:
                self._set_trunk(layers, prompts[0][:trunk], last_trunk)
            steps = max(r.max_new_tokens for r in requests)
            width = max(len(p) for p in own)
            taken = self._prefill(own, trunk, steps, layers, state)
            lengths = torch.tensor([len(p) for p in own]).unsqueeze(1)
            padding = (torch.arange(width) >= lengths).view(len(own), 1, 1, width).to(self.device)
            kept = list(range(len(prompts)))  # cache row i holds request kept[i]
            for step in range(steps):
                live = state.live
                if not live:
                    break
                if len(live) <= 0.75 * len(kept):  # rows whose requests ended leave the cache
                    rows = self._tensor([kept.index(k) for k in live])
                    for layer in layers:
                        layer.cache = tuple(t.index_select(0, rows) for t in layer.cache)
                    padding, kept = padding.index_select(0, rows), live
                for layer in layers:
                    layer.padding, layer.step = padding, step
                row_of = {k: i for i, k in enumerate(kept)}
                best = self._forward(
                    self._tensor([taken.get(k, 0) for k in kept]).unsqueeze(1),  # ended rows feed a dummy
                    self._tensor([len(prompts[k]) + step if k in taken else 0 for k in kept]).unsqueeze(1),
                    None,
                    self._tensor([row_of[k] for k in live]),
                    self._tensor([0] * len(live)),
                    _most_likely,
                )
                taken = {k: t for k, t in zip(live, state.step(live, *best)) if t is not None}
        return state.results()

    def _set_trunk(self, layers: list[FastAttention], tokens: list[int], last: _Trunk) -> None:
        """Gives every layer the keys and values of `tokens` as its trunk. The part that starts the last
        group's trunk is reused (groups come in lexicographic order: a group split by the cache's size has
        the same trunk as the one before, and a prompt that kept fewer in-context examples shares most of
        them); the rest is computed attending to it. `last` becomes this trunk."""
        reused = _common_prefix(last.tokens, tokens)
        for layer, (keys, values) in zip(layers, last.layers):
            layer.trunk = (keys[:, :reused], values[:, :reused]) if reused else None
        if reused == len(tokens):
            return
        chain = _PackedRow()
        for token in tokens[reused:]:
            chain.add(token, len(chain.tokens) - 1)
        for layer in layers:
            layer.keep = True
        self._packed_forward(layers, [chain], [], first_position=reused)  # keys and values only
        for layer in layers:
            computed = [t.transpose(0, 1) for t in layer.fresh]
            if layer.trunk is not None:
                computed = [torch.cat(pair, dim=1) for pair in zip(layer.trunk, computed)]
            layer.trunk = computed[0].contiguous(), computed[1].contiguous()
            layer.fresh, layer.keep = None, False
        last.tokens, last.layers = list(tokens), [layer.trunk for layer in layers]

    def _prefill(
        self, own: list[list[int]], trunk: int, steps: int, layers: list[FastAttention], state: _Greedy
    ) -> dict[int, int]:
        """Computes each prompt's part after the trunk, packed into prefix trees (`_batches` of rows),
        and leaves its keys and values in the request's row of the prompts' cache (as wide as the longest
        part), next to a cache of `steps` generated tokens per request. Takes each request's first token:
        returns request -> token, for the requests that go on."""
        rows = self._pack(own, trunk)
        width = max(len(p) for p in own)
        taken: dict[int, int] = {}
        for layer in layers:
            layer.keep = True
        for batch in self._batches(rows):
            members = [(r, k) for r, row in enumerate(batch) for k in row.paths]
            last_nodes = [(r, batch[r].paths[k][-1]) for r, k in members]
            best, offsets = self._packed_forward(layers, batch, last_nodes, _most_likely, trunk)
            live = [i for i, (_, k) in enumerate(members) if state.reasons[k] is None]
            chosen = state.step([members[i][1] for i in live], *(t[self._tensor(live)] for t in best))
            taken.update((members[i][1], t) for i, t in zip(live, chosen) if t is not None)
            sources, target_rows, target_positions = [], [], []
            for r, k in members:
                path = batch[r].paths[k]
                sources += [offsets[r] + node for node in path]
                target_rows += [k] * len(path)
                target_positions += range(len(path))
            sources = self._tensor(sources)
            target_rows, target_positions = self._tensor(target_rows), self._tensor(target_positions)
            for layer in layers:
                fresh, layer.fresh = layer.fresh, None
                if layer.cache is None:
                    _, groups, dim = fresh[0].shape
                    keys, values = fresh
                    layer.cache = (
                        keys.new_empty(len(own), groups, width, dim),
                        # the padding's keys are masked out; its values get a zero weight, so must be finite
                        values.new_zeros(len(own), groups, width, dim),
                        keys.new_empty(len(own), groups, steps, dim),
                        values.new_empty(len(own), groups, steps, dim),
                    )
                for cached, computed in zip(layer.cache[:2], fresh):
                    cached[target_rows, :, target_positions] = computed[sources]
        for layer in layers:
            layer.keep = False
        return taken


def _fusable_gelu(module: torch.nn.Module) -> str | None:
    """For a Megatron MLP computing GELU(x W1^T + b1) W2^T: the GELU it uses, "erf" (torch's gelu) or "tanh"
    (Megatron's bias-GELU fusion, the tanh approximation). None for any other module or MLP (gated, another
    activation, Transformer Engine's)."""
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.mlp import MLP

    if type(module) is not MLP or type(module.linear_fc1) is not ColumnParallelLinear:
        return None
    config = module.config
    if config.gated_linear_unit or config.use_te_activation_func or module.activation_func is not F.gelu:
        return None
    if module.linear_fc1.weight is None:
        return None
    return "tanh" if config.bias_activation_fusion else "erf"


def _fused_mlp(mlp, linear: OneDnnLinear, gelu: str, hidden_states, per_token_scale=None, **kwargs):
    """`MLP.forward` with the first linear layer's bias and the GELU applied by its kernel (Megatron adds
    the bias and applies GELU as two passes over the [positions, 4 x hidden] activations)."""
    if per_token_scale is not None:
        return type(mlp).forward(mlp, hidden_states, per_token_scale, **kwargs)
    fc1 = mlp.linear_fc1
    return mlp.linear_fc2(linear(hidden_states, fc1.weight, fc1.bias, gelu=gelu))


def _most_likely(logprobs: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_forward`'s `read` for greedy decoding: each row's largest log-probability and its token."""
    return logprobs.max(dim=-1)


class _Greedy:
    """Greedy choice, stop checks and results for a batch of generation requests."""

    def __init__(self, requests: list[GenerationRequest], end_of_text: int | None):
        self.requests = requests
        self.end_of_text = end_of_text
        self.budget = [max(r.max_new_tokens, 0) for r in requests]
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.logprobs: list[list[float]] = [[] for _ in requests]
        self.reasons: list[str | None] = [None if b > 0 else LENGTH for b in self.budget]

    @property
    def live(self) -> list[int]:
        return [i for i, reason in enumerate(self.reasons) if reason is None]

    def step(self, live: list[int], best_logprob: torch.Tensor, best: torch.Tensor) -> list[int | None]:
        """Take each live request's next token (`best`, log-probability `best_logprob`, one row per live
        request); None where it ended instead."""
        best_logprob, best = best_logprob.tolist(), best.tolist()
        taken: list[int | None] = []
        for row, i in enumerate(live):
            token = best[row]
            if token == self.end_of_text:  # ends the text; not part of it
                self.reasons[i] = END_OF_TEXT
                taken.append(None)
                continue
            self.tokens[i].append(token)
            self.logprobs[i].append(best_logprob[row])
            taken.append(token)
            request = self.requests[i]
            if request.is_done is not None and request.is_done(self.tokens[i]):
                self.reasons[i] = STOP
            elif len(self.tokens[i]) >= self.budget[i]:
                self.reasons[i] = LENGTH
        return taken

    def results(self) -> list[Generation]:
        return [Generation(t, lp, str(r)) for t, lp, r in zip(self.tokens, self.logprobs, self.reasons)]
