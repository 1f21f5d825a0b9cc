"""Log-prob scoring and greedy generation on a Megatron `GPTModel`, doing as little work as the answers need.

The engine knows token ids only: HELM's text, stop sequences and tokenizer live in `helm/client.py`.
Three savings apply to every model:

- identical requests are computed once;
- the output layer (hidden x vocabulary, the largest matmul of a small model) runs only at the
  positions whose log-probability or next token is used, through `GPTModel`'s `output_processor`;
- batches are grouped by length.

Two more need each token's position to be its own, not its index in the batch: learned absolute
embeddings (GPT-2 style: the position is an input) or rotary embeddings (Llama style: the engine's
attention rotates queries and keys at each token's position, with the model's own angles). They use
the engine's own attention kernel in place of the model's core attention for the duration of a call
(`FastAttention`):

- scoring packs requests into prefix trees: a multiple-choice question shared by its four answers
  is computed once, each token attending only to its own ancestors; a forward pass holds trees one
  after the other with no padding (attention runs tree by tree on CPU, on padded batches of trees
  elsewhere);
- generation keeps a key/value cache, so each new token costs one position, not the whole prefix;
  the prompts' common trunk (the in-context examples) is computed and stored once, and each step
  feeds one token for every request of a group sized by the cache's memory, not by batch_size.

Models with other position encodings (YaRN, multimodal rotary) take the plain path: every request
recomputed in full, with Megatron's own attention; a log line says why. Both paths give the same numbers
up to float rounding. On a model with layers the test suite cannot run (Transformer Engine's, on GPU), the
engine checks this at its first call: a probe scored and generated on both paths must agree, or the engine
logs the difference and takes the plain path (`_check_fast_path`).

On CPU, both paths run the model's float32 linear layers through oneDNN's kernel (`OneDnnLinear`, with
weights reordered once into its blocked layout) rather than PyTorch's default MKL call, about twice as
fast on AMD processors; a GELU MLP's first matmul also adds its bias and applies the GELU.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_eval_hook.allocator import keep_freed_memory
from megatron_eval_hook.engine.attention import Decoding, FastAttention, KeysValues, Rotation, Trees, tree_batches
from megatron_eval_hook.engine.backend import GREEDY, Targets, backend_for
from megatron_eval_hook.engine.cpu import fast_linears, onednn_linear
from megatron_eval_hook.engine.memory import Footprint, Sizes, fitted, usable_memory
from megatron_eval_hook.engine.plan import (
    CACHE_BATCHES,
    CPU_PASS_POSITIONS,
    ROW_TOKENS,
    Planner,
    _common_prefix,
    _common_trunk,
    _PackedRow,
)
from megatron_eval_hook.engine.requests import END_OF_TEXT, LENGTH, STOP, Generation, GenerationRequest, RequestTooLong

logger = logging.getLogger(__name__)

# The fast path's first call on layers the test suite cannot run (`unverified_layers`) is checked against the
# plain path: the largest log-probability difference allowed on the probe, by the model's dtype. A half-precision
# forward pass rounds differently on each path (about 0.1 on the test models); a position or cache mistake moves
# log-probabilities by 1 or more.
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.5}
_said: set[str] = set()  # log lines said once per process, not at every save


def _say_once(level: int, message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.log(level, message)


# The output layer runs on at most this many bytes of float32 logits at a time, each slice normalized and
# read at once: on CPU, while they are in the last-level cache (GPT-2's 50k vocabulary: 125 rows, 24 MiB;
# a [2048, 50k] block at once is 400 MiB, written and read back from memory); on GPU it bounds the memory.
OUTPUT_BYTES_CPU, OUTPUT_BYTES_GPU = 24 << 20, 1 << 30


def fast_path_unsupported(model: torch.nn.Module) -> str | None:
    """Why the prefix-tree and key/value-cache paths cannot run on `model`; None when they can."""
    from megatron.core.transformer.attention import SelfAttention

    config = model.config
    if getattr(model, "position_embedding_type", None) not in ("learned_absolute", "rope"):
        return f"position_embedding_type={getattr(model, 'position_embedding_type', None)!r}"
    for name, unsupported in (
        ("multi_latent_attention", bool(getattr(config, "multi_latent_attention", False))),
        ("softmax_type", getattr(config, "softmax_type", "vanilla") != "vanilla"),
        ("window_size", getattr(config, "window_size", None) is not None),
        ("context_parallel_size", config.context_parallel_size > 1),
    ):
        if unsupported:
            return f"{name}={getattr(config, name)!r}"
    if not any(isinstance(m, SelfAttention) for m in model.modules()):
        return "no self-attention layers"
    return None


def unverified_layers(model: torch.nn.Module) -> list[str]:
    """The class names of `model`'s layers that the fast path's tests cannot run: Transformer Engine's (GPU only).
    The engine checks its fast path against the plain path on these before using it."""
    return sorted(
        {
            type(m).__name__
            for m in model.modules()
            if type(m).__module__.startswith(("transformer_engine", "megatron.core.extensions.transformer_engine"))
        }
    )


@dataclass
class _Trunk:
    """A decoding group's common trunk and, per layer, its keys and values ([groups, t, d] each)."""

    tokens: list[int] = field(default_factory=list)
    layers: list[KeysValues] = field(default_factory=list)


class Engine:
    """Evaluation forward passes on a Megatron `GPTModel`: the whole model on this rank, or this rank's part of
    a model split by tensor and pipeline parallelism (`backend.py`), every rank of its model-parallel group
    calling the engine with the same requests.

    `vocab_size` is the tokenizer's vocabulary: the model's padded vocabulary rows beyond it
    are never predicted. `max_sequence_length` is the context window, in tokens. `batch_size`
    is the number of sequences per forward pass (generation, plain scoring), or of `row_tokens`
    positions (packed scoring and prompts). `decode` gives the text of generated tokens, to find
    stop sequences. `padded_trees`: attention over a pass's prefix trees on padded batches of trees
    (`FastAttention`); by default off on CPU, on elsewhere. `gather_logits`: under tensor parallelism,
    gather the full logits instead of reading the split ones (the same numbers to float rounding).
    `memory`: the bytes its passes and caches may take on this rank (`memory.py`); by default, on a GPU,
    80% of what is free there when the engine is built; on CPU no limit.

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
        decode: Callable[[list[int]], str] | None = None,
        fast: bool = True,
        row_tokens: int = ROW_TOKENS,
        padded_trees: bool | None = None,
        gather_logits: bool = False,
        memory: int | None = None,
    ):
        self.model = model
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.batch_size = batch_size
        self.end_of_text = end_of_text
        self.decode = decode
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory()
        self.plain_reason = fast_path_unsupported(model) if fast else "fast=False"
        if self.plain_reason is not None and fast:
            _say_once(logging.WARNING, f"engine: the model takes the plain path (every request recomputed in full, "
                      f"no key/value cache: several times slower): {self.plain_reason}")  # fmt: skip
        # layers checked at the first call, before the fast path serves any request (`_check_fast_path`)
        self._unchecked = unverified_layers(model) if self.plain_reason is None else []
        self.row_tokens = row_tokens
        dtype = next(model.parameters()).dtype
        self.linear = onednn_linear() if self.device.type == "cpu" and dtype == torch.float32 else None
        # attention over a pass's trees: on CPU tree by tree (no work on padding), elsewhere on padded batches
        # of trees: a few kernel calls per layer, where a call per tree costs more in launches than in arithmetic
        self.padded_trees = self.device.type != "cpu" if padded_trees is None else padded_trees
        pass_positions = batch_size * row_tokens
        if self.device.type == "cpu":
            pass_positions = min(pass_positions, CPU_PASS_POSITIONS)
        configured = Sizes(pass_positions, CACHE_BATCHES * batch_size * row_tokens, batch_size * max_sequence_length)
        memory = usable_memory(self.device) if memory is None else memory
        self.sizes = fitted(configured, Footprint.of(model, max_sequence_length), memory, least=row_tokens)
        self.planner = Planner(
            row_tokens=row_tokens,
            pass_positions=self.sizes.pass_positions,
            cache_positions=self.sizes.cache_positions,
            hidden_size=model.config.hidden_size,
        )
        # cos and sin of the rotary angles of every position of the window [window, 1, 1, d'], from the model's
        # own rotary module (its base, percent, scaling and interpolation), computed once in float32 and cast to
        # the model's dtype: the fast path rotates each token at its own position
        self._rotary: Rotation | None = None
        if self.plain_reason is None and model.position_embedding_type == "rope":
            angles = model.rotary_pos_emb(max_sequence_length).float()
            self._rotary = tuple(f(angles).to(self.device, dtype) for f in (torch.cos, torch.sin))
        output_bytes = OUTPUT_BYTES_CPU if self.device.type == "cpu" else OUTPUT_BYTES_GPU
        self.backend = backend_for(model, vocab_size, max(1, output_bytes // (4 * vocab_size)), gather_logits)

    @property
    def pass_positions(self) -> int:
        return self.planner.pass_positions

    def resize(self, sizes: Sizes) -> None:
        """Plan for `sizes` from now on: the sizes every rank of a model-parallel group agreed on (each rank
        must plan the same passes), none larger than this rank's own."""
        self.sizes = sizes
        self.planner = dataclasses.replace(
            self.planner, pass_positions=sizes.pass_positions, cache_positions=sizes.cache_positions
        )

    def release(self) -> None:
        """Free what the engine keeps between calls (on CPU, the reordered linear weights)."""
        if self.linear is not None:
            self.linear.release()

    # -- forward passes ----------------------------------------------------------------------

    def _fast_linears(self):
        return fast_linears(self.model, self.linear)

    @contextmanager
    def _fast_attention(self) -> Iterator[None]:
        """Swap every layer's core attention for a `FastAttention` for the duration of the block: the passes
        made meanwhile give the model the plan of their attention (`Trees`, `Decoding`) as its mask."""
        from megatron.core.transformer.attention import SelfAttention

        attentions = [m for m in self.model.modules() if isinstance(m, SelfAttention)]
        originals = [m.core_attention for m in attentions]
        config = self.model.config
        scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        for layer, module in enumerate(attentions):
            module.core_attention = FastAttention(scale, layer, bool(getattr(config, "rotary_interleaved", False)))
        if self._rotary is not None:  # FastAttention rotates queries and keys at the plan's positions instead
            self.model.position_embedding_type = "none"
        try:
            yield
        finally:
            for module, original in zip(attentions, originals):
                module.core_attention = original
            if self._rotary is not None:
                self.model.position_embedding_type = "rope"

    def _rotation(self, positions: torch.Tensor) -> Rotation | None:
        """The rotation of `positions` [b, s] as the engine's attention takes it: cos and sin [s, b, 1, d']
        each (None for a model with learned positions)."""
        if self._rotary is None:
            return None
        index = positions.t()
        return self._rotary[0][index].squeeze(-2), self._rotary[1][index].squeeze(-2)

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
        if self._unchecked:
            self._check_fast_path()
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
        log-probabilities `forward(read)` computes (the backend's `Targets` read); 0.0 at the tokens not picked.
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
        (values,) = forward(Targets(targets))
        values = values.cpu().numpy()[at].tolist()
        results = [[0.0] * len(s) for s in sequences]
        for (k, i, _), value in zip(picks, values):
            results[k][i] = value
        return results

    def _score_plain(self, sequences, wanted) -> list[list[float]]:
        results: list[list[float]] = [[] for _ in sequences]
        order = sorted(range(len(sequences)), key=lambda k: -len(sequences[k]))
        for batch in self._plain_batches(order, lambda k: len(sequences[k])):
            width = max(len(sequences[k]) for k in batch)
            picks, rows, columns = [], [], []
            for row, k in enumerate(batch):
                for i in wanted[k]:
                    picks.append((row, i, len(rows)))
                    rows.append(row)
                    columns.append(i - 1)  # the logits at position i-1 predict token i
            forward = functools.partial(
                self.backend,
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

    def _plain_batches(self, order: list[int], width: Callable[[int], int]) -> list[list[int]]:
        """`order` (longest first) cut into batches of at most batch_size sequences, and of at most
        `sizes.plain_positions` positions but for a sequence alone; `width(k)`: the positions k takes."""
        batches, start = [], 0
        while start < len(order):
            count = max(1, min(self.batch_size, self.sizes.plain_positions // max(width(order[start]), 1)))
            batches.append(order[start : start + count])
            start += count
        return batches

    def _packed_forward(
        self,
        rows: Sequence[_PackedRow],
        picks,
        read=None,
        first_position: int = 0,
        trunks: Sequence[KeysValues] | None = None,
        kept: dict[int, KeysValues] | None = None,
    ):
        """One forward pass over prefix trees laid one after the other, with no padding: what `read` takes
        (see the backend) from the log-probabilities at `picks` [(row, node)]. The trees follow the
        `first_position` positions of each layer's trunk (`trunks`), which every node sees; their position ids
        start there. With `kept`, each layer leaves the pass's keys and values there. Returns what `read` took
        and the offset of each row's first node in the pass."""
        offsets = list(itertools.accumulate((len(row.tokens) for row in rows[:-1]), initial=0))
        positions = self._tensor([first_position + d for row in rows for d in row.depths]).unsqueeze(0)
        plan = Trees(trunks=trunks, kept=kept, rotary=self._rotation(positions))
        if self.padded_trees:
            dtype = next(self.model.parameters()).dtype
            plan.padded = tree_batches(rows, offsets, first_position, self.model.config, dtype, self.device)
        else:
            plan.rows = []
            for first, row in zip(offsets, rows):
                seen = np.concatenate([np.ones((len(row.tokens), first_position), dtype=bool), row.visible()], axis=1)
                plan.rows.append((first, torch.from_numpy(seen)[None, None].to(self.device)))
        read_picks = self.backend(
            self._tensor([t for row in rows for t in row.tokens]).unsqueeze(0),
            positions,
            plan,
            self._tensor([0] * len(picks)),
            self._tensor([offsets[r] + node for r, node in picks]),
            read,
        )
        return read_picks, offsets

    def _score_packed(self, sequences, wanted) -> list[list[float]]:
        results: list[list[float]] = [[] for _ in sequences]
        rows = self.planner.pack([s[:-1] for s in sequences])  # a sequence's last token predicts nothing that is read
        with self._fast_attention():
            for batch in self.planner.passes(rows):
                members, picks = [], []
                picked: dict[tuple[int, int], int] = {}  # (row, node) -> logits row
                for r, row in enumerate(batch):
                    for k, path in row.paths.items():
                        local = len(members)
                        members.append(k)
                        for i in wanted[k]:
                            node = path[i - 1]  # the logits after token i-1 predict token i
                            picks.append((local, i, picked.setdefault((r, node), len(picked))))
                forward = functools.partial(self._packed_forward, batch, list(picked))
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
            if request.stop_sequences and self.decode is None:
                raise ValueError("a request has stop sequences, but the engine was given no `decode` to find them")
        if self._unchecked:
            self._check_fast_path()
        prompts = [self._fit_prompt(r) for r in requests]
        results: list[Generation | None] = [None] * len(requests)
        if self.plain_reason is None:
            # in lexicographic order, prompts sharing a prefix (the same in-context examples) are neighbours
            order = sorted(range(len(prompts)), key=lambda i: prompts[i])
            wanted = [r.max_new_tokens for r in requests]
            groups, last_trunk = self.planner.decoding_groups(order, prompts, wanted), _Trunk()
            run = functools.partial(self._generate_cached, last_trunk=last_trunk)
        else:  # neighbours have similar lengths
            run, order = self._generate_plain, sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
            groups = self._plain_batches(order, lambda i: len(prompts[i]) + requests[i].max_new_tokens)
        with self._fast_linears():
            for group in groups:
                for i, generation in zip(group, run([prompts[i] for i in group], [requests[i] for i in group])):
                    results[i] = generation
        return [r for r in results if r is not None]

    def _check_fast_path(self) -> None:
        """Score a probe (two sequences sharing a prefix: one prefix tree) and generate from its prefix on the
        fast path, then score the same tokens on the plain path, with the model's own attention. If any
        log-probability differs by more than PROBE_TOLERANCE, say so and take the plain path from now on.
        Every rank of a model-parallel group checks at the same call, on the same probe, and reads the same
        log-probabilities, so all decide alike."""
        layers, self._unchecked = self._unchecked, []
        vocab, length = self.vocab_size, min(24, self.max_sequence_length - 4)
        first = [(7 * i + 3) % vocab for i in range(length)]
        second = first[: length // 2] + [(5 * i + 1) % vocab for i in range(length - length // 2)]
        prompt = first[: length // 2]
        fast = self.score([first, second])
        (generated,) = self.generate([GenerationRequest(prompt, 4)])
        self.plain_reason = "checking the fast path"
        try:
            plain = self.score([first, second, prompt + generated.tokens])
        finally:
            self.plain_reason = None
        pairs = [*zip(fast[0], plain[0]), *zip(fast[1], plain[1]), *zip(generated.logprobs, plain[2][len(prompt) :])]
        worst = max(abs(a - b) for a, b in pairs)
        tolerance = PROBE_TOLERANCE.get(next(self.model.parameters()).dtype, 0.5)
        if worst <= tolerance:
            _say_once(logging.INFO, f"engine: the fast path agrees with the model's own forward pass on "
                      f"{', '.join(layers)} (largest log-probability difference {worst:.2g})")  # fmt: skip
            return
        self.plain_reason = (
            f"on layers {', '.join(layers)} the fast path's log-probabilities differ from the model's own forward "
            f"pass by {worst:.3g} (more than {tolerance:g})"
        )
        _say_once(logging.WARNING, f"engine: the model takes the plain path (every request recomputed in full, "
                  f"no key/value cache: several times slower): {self.plain_reason}")  # fmt: skip

    def _fit_prompt(self, request: GenerationRequest) -> list[int]:
        # Keep the end of a prompt that would leave too little room (HELM normally fits it first).
        room = self.max_sequence_length - max(request.max_new_tokens, 0)
        return list(request.prompt[-room:]) if len(request.prompt) > room else list(request.prompt)

    def _generate_plain(self, prompts: list[list[int]], requests: list[GenerationRequest]) -> list[Generation]:
        state = _Greedy(requests, self.end_of_text, self.decode)
        tokens = [list(p) for p in prompts]
        while state.live:
            live = state.live
            width = max(len(tokens[i]) for i in live)
            best = self.backend(
                self._padded([tokens[i] for i in live], width),
                self._tensor(range(width)).unsqueeze(0).expand(len(live), width),
                self._causal(width),
                self._tensor(range(len(live))),
                self._tensor([len(tokens[i]) - 1 for i in live]),
                GREEDY,
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
        state = _Greedy(requests, self.end_of_text, self.decode)
        if not state.live:
            return state.results()
        trunk = len(_common_trunk(prompts))
        own = [p[trunk:] for p in prompts]
        with self._fast_attention():
            trunks = self._trunk(prompts[0][:trunk], last_trunk) if trunk else None
            steps = max(r.max_new_tokens for r in requests)
            width = max(len(p) for p in own)
            caches, taken = self._prefill(own, trunk, steps, trunks, state)
            lengths = torch.tensor([len(p) for p in own]).unsqueeze(1)
            padding = (torch.arange(width) >= lengths).view(len(own), 1, 1, width).to(self.device)
            kept = list(range(len(prompts)))  # cache row i holds request kept[i]
            for step in range(steps):
                live = state.live
                if not live:
                    break
                if len(live) <= 0.75 * len(kept):  # rows whose requests ended leave the cache
                    rows = self._tensor([kept.index(k) for k in live])
                    caches = [tuple(t.index_select(0, rows) for t in cache) for cache in caches]
                    padding, kept = padding.index_select(0, rows), live
                row_of = {k: i for i, k in enumerate(kept)}
                positions = self._tensor([len(prompts[k]) + step if k in taken else 0 for k in kept]).unsqueeze(1)
                best = self.backend(
                    self._tensor([taken.get(k, 0) for k in kept]).unsqueeze(1),  # ended rows feed a dummy
                    positions,
                    Decoding(caches, padding, step, trunks, self._rotation(positions)),
                    self._tensor([row_of[k] for k in live]),
                    self._tensor([0] * len(live)),
                    GREEDY,
                )
                taken = {k: t for k, t in zip(live, state.step(live, *best)) if t is not None}
        return state.results()

    def _trunk(self, tokens: list[int], last: _Trunk) -> list[KeysValues]:
        """Every layer's keys and values of `tokens`, the trunk of a decoding group. The part that starts the
        last group's trunk is reused (groups come in lexicographic order: a group split by the cache's size
        has the same trunk as the one before, and a prompt that kept fewer in-context examples shares most of
        them); the rest is computed attending to it. `last` becomes this trunk."""
        reused = _common_prefix(last.tokens, tokens)
        parts = [(keys[:, :reused], values[:, :reused]) for keys, values in last.layers] if reused else None
        if reused == len(tokens):
            return parts
        chain = _PackedRow()
        for token in tokens[reused:]:
            chain.add(token, len(chain.tokens) - 1)
        kept: dict[int, KeysValues] = {}
        self._packed_forward([chain], [], first_position=reused, trunks=parts, kept=kept)  # keys and values only
        trunks = []
        for layer in range(len(kept)):
            computed = [t.transpose(0, 1) for t in kept[layer]]
            if parts is not None:
                computed = [torch.cat(pair, dim=1) for pair in zip(parts[layer], computed)]
            trunks.append((computed[0].contiguous(), computed[1].contiguous()))
        last.tokens, last.layers = list(tokens), trunks
        return trunks

    def _prefill(
        self, own: list[list[int]], trunk: int, steps: int, trunks: list[KeysValues] | None, state: _Greedy
    ) -> tuple[list[tuple[torch.Tensor, ...]], dict[int, int]]:
        """Computes each prompt's part after the trunk (each layer's `trunks`, `trunk` positions), packed into
        prefix trees (`Planner.passes` of rows), and leaves its keys and values in the request's row of the
        prompts' cache (as wide as the longest part), next to a cache of `steps` generated tokens per request.
        Takes each request's first token. Returns each layer's cache, and request -> token for the requests
        that go on."""
        rows = self.planner.pack(own, trunk)
        width = max(len(p) for p in own)
        taken: dict[int, int] = {}
        caches: list[tuple[torch.Tensor, ...]] | None = None
        for batch in self.planner.passes(rows):
            members = [(r, k) for r, row in enumerate(batch) for k in row.paths]
            last_nodes = [(r, batch[r].paths[k][-1]) for r, k in members]
            kept: dict[int, KeysValues] = {}
            best, offsets = self._packed_forward(batch, last_nodes, GREEDY, trunk, trunks, kept)
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
            if caches is None:
                caches = []
                for layer in range(len(kept)):
                    keys, values = kept[layer]
                    _, groups, dim = keys.shape
                    caches.append(
                        (
                            keys.new_empty(len(own), groups, width, dim),
                            # the padding's keys are masked out; its values get a zero weight, so must be finite
                            values.new_zeros(len(own), groups, width, dim),
                            keys.new_empty(len(own), groups, steps, dim),
                            values.new_empty(len(own), groups, steps, dim),
                        )
                    )
            for layer, cache in enumerate(caches):
                for cached, computed in zip(cache[:2], kept[layer]):
                    cached[target_rows, :, target_positions] = computed[sources]
        return caches or [], taken


class _Greedy:
    """Greedy choice, stop checks and results for a batch of generation requests."""

    def __init__(
        self, requests: list[GenerationRequest], end_of_text: int | None, decode: Callable[[list[int]], str] | None
    ):
        self.requests = requests
        self.end_of_text = end_of_text
        self.decode = decode
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
            if request.stop_sequences and self._stopped(request.stop_sequences, self.tokens[i]):
                self.reasons[i] = STOP
            elif len(self.tokens[i]) >= self.budget[i]:
                self.reasons[i] = LENGTH
        return taken

    def _stopped(self, stop_sequences: tuple[str, ...], tokens: list[int]) -> bool:
        text = self.decode(tokens)
        return any(stop in text for stop in stop_sequences)

    def results(self) -> list[Generation]:
        return [Generation(t, lp, str(r)) for t, lp, r in zip(self.tokens, self.logprobs, self.reasons)]
