"""The engine's plan: which positions go into which forward pass, which requests decode together, and
which requests each data-parallel replica computes.

Pure functions of token ids and sizes (no model, no tensors): every rank computes the same plan from the
same requests, which is what lets the ranks of a model-parallel group take the same steps without asking
each other (`engine/sharded.py`)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

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


@dataclass(frozen=True)
class Planner:
    """The sizes a plan is made for: `row_tokens` (prefix trees hold 1 to 4 times this many tokens),
    `pass_positions` (positions per forward pass), `cache_positions` (a decoding group's key/value cache)
    and the model's `hidden_size` (what a position costs against an attention key)."""

    row_tokens: int
    pass_positions: int
    cache_positions: int
    hidden_size: int

    def work(self, sizes: Sequence[int], trunk: int) -> float:
        """Estimated cost of forward passes over trees of these sizes, in units of one attention key: per
        position, a layer's matmuls cost 24 x hidden^2 FLOPs and each key it attends to 4 x hidden, so a
        position costs 6 x hidden + its keys (the trunk and its tree)."""
        return sum(size * (6 * self.hidden_size + trunk + size) for size in sizes)

    def pack(self, sequences: Sequence[Sequence[int]], trunk: int = 0) -> list[_PackedRow]:
        """Prefix trees holding every sequence once, largest first, for the least estimated work.

        Sequences sharing a prefix (a question's answer choices, several questions on one passage) go in
        one tree, each token attending only to its own ancestors. Attention runs over a tree as a whole
        (each node against every node), so a tree over a limit of nodes is split where its sequences
        part, the shared part computed once per piece. Which limit is best depends on the trees: the
        limits tried are 1 to 4 x row_tokens, priced by `work` (`trunk`: keys every position also
        attends to)."""
        order = sorted(range(len(sequences)), key=lambda k: tuple(sequences[k]))
        lengths = [len(sequences[k]) for k in order]
        shared = [0] + [_common_prefix(sequences[a], sequences[b]) for a, b in zip(order, order[1:])]
        trees = min(
            (_trees(lengths, shared, self.row_tokens * m) for m in (1, 2, 3, 4)),
            key=lambda runs: self.work([nodes for _, _, nodes in runs], trunk),
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

    def passes(self, rows: list[_PackedRow]) -> list[list[_PackedRow]]:
        """Rows (largest first) in as few forward passes of at most `pass_positions` as this finds, of even
        sizes: each row goes to the emptiest pass, or a new one where it does not fit (a row larger than a
        pass takes one of its own). Passes of even sizes keep every matmul large."""
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

    def decoding_groups(self, order: list[int], prompts: list[list[int]], wanted: list[int]) -> list[list[int]]:
        """Runs of `order` decoded together: prompts that share a trunk (`_trunk_classes`), as many at a
        time as keep the group's key/value cache within `cache_positions`.

        A group caches its common trunk once, and per request the longest prompt part after the trunk
        plus the most new tokens (`wanted`). Each decoding step feeds one token per request: the more
        requests per step, the more of the step's weight traffic each token shares."""
        budget = self.cache_positions
        groups: list[_Group] = []
        for members in _trunk_classes(order, prompts, wanted):
            group = None
            for i in members:
                prompt, new = prompts[i], wanted[i]
                if group is not None:
                    trunk = min(group.trunk, _common_prefix(prompts[group.members[0]], prompt), len(prompt) - 1)
                    longest, new_tokens = max(group.longest, len(prompt)), max(group.new_tokens, new)
                    if trunk + (len(group.members) + 1) * (longest - trunk + new_tokens) <= budget:
                        group.members.append(i)
                        group.trunk, group.longest, group.new_tokens = trunk, longest, new_tokens
                        continue
                group = _Group([i], trunk=len(prompt) - 1, longest=len(prompt), new_tokens=new)
                groups.append(group)
        return [group.members for group in groups]

    def split_scoring(self, sequences: Sequence[Sequence[int]], parts: int) -> list[list[int]]:
        """The indices of `sequences` each of `parts` data-parallel replicas scores: whole prefix trees (a
        question stays with its answers), balanced by estimated work, largest tree first to the replica
        with the least so far. Every replica packs its share into the same trees again."""
        return _balanced([(self.work([len(row.tokens)], 0), sorted(row.paths)) for row in self.pack(sequences)], parts)

    def split_generation(self, prompts: Sequence[Sequence[int]], wanted: Sequence[int], parts: int) -> list[list[int]]:
        """The indices of `prompts` each of `parts` data-parallel replicas generates for: in lexicographic
        order dealt in turn, so each replica gets every trunk its requests share (and computes it itself)
        and a like mix of lengths; `wanted`: new tokens per request."""
        order = sorted(range(len(prompts)), key=lambda k: (tuple(prompts[k]), wanted[k]))
        return [sorted(order[part::parts]) for part in range(parts)]


def _balanced(items: list[tuple[float, list[int]]], parts: int) -> list[list[int]]:
    """Items (cost, indices) assigned whole to `parts` bins, costliest first to the least loaded bin (ties:
    the lowest bin); each bin's indices sorted."""
    loads: list[tuple[float, int]] = [(0.0, part) for part in range(parts)]
    bins: list[list[int]] = [[] for _ in range(parts)]
    for cost, indices in sorted(items, key=lambda item: (-item[0], item[1])):
        load, part = heapq.heappop(loads)
        bins[part].extend(indices)
        heapq.heappush(loads, (load + cost, part))
    return [sorted(b) for b in bins]
