"""Throughput of the hook's engine against HELM's HuggingFaceClient and lm-evaluation-harness, same requests.

    python bench/throughput.py [--arch gpt2|llama] [--size small|1b] [--dtype float32|bfloat16]
                               [--instances 100] [--engines ours,helm_hf,lm_eval] [--device cpu|cuda]
                               [--batch-size 16] [--data-dir ../shared/data] [--quick]

One model (a Megatron GPTModel with random weights, `SHAPES`: by default GPT-2 small, 124M parameters; with
``--arch llama`` a Llama-style model of the same width and depth: rotary positions, RMSNorm, SwiGLU,
grouped-query attention, no biases, untied embeddings; ``--size 1b`` a Llama-3.2-1B-like shape for GPUs),
one set of HELM requests, three engines, one process:

* ``ours``: the hook's engine as the hook uses it: ``InProcessModel(Engine(...), tokenizer)``; for each HELM
  run, ``prefetch`` the run's request states in batches, then ``answer`` each request;
* ``helm_hf``: HELM's own ``HuggingFaceClient`` on the weights exported with ``export.to_hf``, executed by
  HELM's ``Executor`` with helm-run's default parallelism (4 threads) and no request cache;
* ``lm_eval``: lm-evaluation-harness's ``HFLM`` on the exported weights, with the same batch size as ours:
  ``loglikelihood`` for the scoring requests, ``generate_until`` (greedy) for the generation requests.

The requests are built by HELM itself (scenario, downsampling, adapter, prompt fitting) for the run entries
below, once; every engine gets the same ``RequestState``s:

* scoring (echo + log-probs): MMLU on HELM Lite's five subjects and HellaSwag, both with
  ``method=multiple_choice_separate_original`` (one request per answer choice);
* generation: BoolQ and NarrativeQA.

Data: with ``--data-dir`` (default: ``../shared/data`` next to the repository, when it exists) the real MMLU,
BoolQ dev (its first ``BOOLQ_TRAIN`` items serve as the in-context examples, as there is no train file) and
HellaSwag val (rebuilt from the llama.cpp text export) are converted into HELM's offline layout in a temporary
folder; NarrativeQA, and anything missing, comes from the CPU demo's generator (``demo_data.py``). The
tokenizer is GPT-2's BPE from the same folder, else the demo's.

What is measured and how:

* The engine's CPU allocator setting (``megatron_eval_hook/allocator.py``: freed memory kept for reuse) is
  process-wide and made when ours is built, before the others: all three engines run with it.
* Only request execution is timed (each engine warmed up first on a few requests). All engines run their
  timed work in the same worker thread: the CPU shims' CUDA-to-CPU torch-function mode is active in the main
  thread only and would otherwise slow every torch operation of whichever engine runs there.
* requests/s: HELM requests answered per second. tokens/s: for every engine the same count, prompt tokens
  (the request's prompt, tokenized with the model's tokenizer) plus completion tokens (the engine's returned
  completion text, tokenized the same way), divided by that engine's time.
* Each ratio in the RESULT line is our throughput over theirs on identical requests (= their time / ours).
* ``useful_flops_util``: the forward FLOPs that a minimal computation of our results needs, divided by our
  wall time and by the peak matmul rate measured in this run (square fp32 matmul on the same device; on
  CPU the faster of PyTorch's matmul, which calls MKL, and oneDNN's, which the engine calls).
  Minimal: every distinct token position (a node of the prefix trie of all token sequences fed to the
  model) once, at ``2 * N + 4 * layers * hidden * (position + 1)`` FLOPs (N: non-embedding parameters, the
  second term: attention scores and weighted values over the causal context), plus the output layer,
  ``2 * hidden * vocab``, only at positions whose next-token distribution is used: for scoring the
  positions that predict the reference tokens HELM reads (the last ``len(tokenize(" " + reference))``
  tokens), for generation the last prompt position and each fed generated token. Tokens fed for
  generation: the prompt, plus the completion's tokens except the last one when the completion ran to
  ``max_tokens`` (otherwise the token that stopped it was predicted as well).

The last line is::

    RESULT scoring_vs_helm_hf=<x> scoring_vs_lm_eval=<x> generation_vs_helm_hf=<x> generation_vs_lm_eval=<x> \
useful_flops_util=<x>
"""

from __future__ import annotations

import argparse
import bz2
import math
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Everything is local: never let transformers or huggingface_hub reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "pretrain_gpt2"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(EXAMPLES))  # the demo's data generator

import torch  # noqa: E402

from megatron_eval_hook.helm.benchmarks import LITE_MMLU_SUBJECTS  # noqa: E402
from megatron_eval_hook.helm.reference import plain_runner, register_hf_deployment  # noqa: E402

SCORING, GENERATION = "scoring", "generation"
SEPARATE = "method=multiple_choice_separate_original"
RUN_ENTRIES: dict[str, tuple[str, tuple[str, ...]]] = {
    # benchmark: (request type, HELM run entries)
    "mmlu": (SCORING, tuple(f"mmlu:subject={s},{SEPARATE}" for s in LITE_MMLU_SUBJECTS)),
    "hellaswag": (SCORING, (f"commonsense:dataset=hellaswag,{SEPARATE}",)),
    "boolq": (GENERATION, ("boolq",)),
    "narrative_qa": (GENERATION, ("narrative_qa",)),
}
ENGINES = ("ours", "helm_hf", "lm_eval")
HELM_DEFAULT_THREADS = 4  # helm-run's --num-threads default
BOOLQ_TRAIN = 100  # BoolQ dev items used as the train split (in-context examples) when converting real data
SHAPES: dict[tuple[str, str], dict[str, int]] = {
    # (arch, size): TransformerConfig shape; "tiny" is --quick's
    ("gpt2", "small"): {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12},
    ("gpt2", "tiny"): {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4},
    # GPT-2 small's depth and width, Llama's proportions: 4 query groups, SwiGLU of 2048 (75M non-embedding)
    ("llama", "small"): {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "num_query_groups": 4,
                         "ffn_hidden_size": 2048},
    ("llama", "tiny"): {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2,
                        "ffn_hidden_size": 352},
    # Llama 3.2 1B's decoder (16 layers, 2048 wide, 32 heads in 8 groups, SwiGLU of 8192)
    ("llama", "1b"): {"num_layers": 16, "hidden_size": 2048, "num_attention_heads": 32, "num_query_groups": 8,
                      "ffn_hidden_size": 8192},
}  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CONTEXT = 1024
LOGPROB_TOLERANCE = 1e-3  # on the summed log-probability of one reference


# --------------------------------------------------------------------------------------------------------
# Data: HELM's offline layout in a temporary folder
# --------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    helm_dir: Path
    vocab_file: Path
    merge_file: Path
    sources: dict[str, str] = field(default_factory=dict)  # what each part comes from, for the report


def default_data_dir() -> Path | None:
    candidate = REPO.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def prepare_data(shared: Path | None, work: Path, instances: int, seed: int = 0) -> Data:
    """Real data from `shared` where it has it, the demo generator's data for the rest."""
    import demo_data as demo

    helm_dir = work / "helm_data"
    helm_dir.mkdir(parents=True)
    sources: dict[str, str] = {}

    def has(*parts: str) -> bool:
        return shared is not None and shared.joinpath(*parts).exists()

    rng = random.Random(f"{seed}:bench")
    facts_rng = random.Random(f"{seed}:facts")
    facts, accords = demo.make_facts(facts_rng), demo.make_accords(facts_rng)

    if has("gpt2", "gpt2-vocab.json") and has("gpt2", "gpt2-merges.txt"):
        vocab_file, merge_file = shared / "gpt2" / "gpt2-vocab.json", shared / "gpt2" / "gpt2-merges.txt"
        sources["tokenizer"] = f"GPT-2 BPE ({shared / 'gpt2'})"
    else:
        (work / "tokenizer").mkdir()
        vocab_file, merge_file = demo.train_tokenizer(demo.make_corpus(facts, accords, seed), work / "tokenizer")
        sources["tokenizer"] = "the demo's generated BPE (2048 tokens)"

    if has("mmlu", "data", "test"):
        (helm_dir / "mmlu" / "data").parent.mkdir()
        (helm_dir / "mmlu" / "data").symlink_to(shared / "mmlu" / "data", target_is_directory=True)
        sources["mmlu"] = f"real ({shared / 'mmlu'})"
    else:
        per_subject = math.ceil(instances / len(LITE_MMLU_SUBJECTS))
        for subject, make in demo.subject_generators(accords).items():
            questions = demo.distinct_questions(make, 5 + per_subject, rng)
            splits = {"dev": questions[:5], "val": [], "test": questions[5:]}
            demo.write_mmlu_subject(helm_dir / "mmlu", subject, splits)
        sources["mmlu"] = "generated (demo_data.py)"

    if has("boolq", "dev.jsonl") and has("boolq", "boolq_perturbed.json"):
        convert_boolq(shared / "boolq", helm_dir / "boolq" / "data")
        sources["boolq"] = f"real dev ({shared / 'boolq'}), its first {BOOLQ_TRAIN} items as the train split"
    else:
        items = [demo.make_boolq_item(rng) for _ in range(instances + 20)]
        demo.write_boolq(helm_dir / "boolq", train=items[:20], dev=items[20:], contrast=0)
        sources["boolq"] = "generated (demo_data.py)"

    if has("hellaswag", "derived_llamacpp_text", "hellaswag_val_full.txt.bz2"):
        convert_hellaswag(shared / "hellaswag" / "derived_llamacpp_text" / "hellaswag_val_full.txt.bz2", helm_dir)
        sources["hellaswag"] = "real val, rebuilt from the llama.cpp text export (WikiHow markers stripped)"
    else:
        rows = demo.hellaswag_rows(rng)
        demo.write_hellaswag(helm_dir / "hellaswag", {"train": rows[:12], "val": rows[12:]})
        sources["hellaswag"] = f"generated (demo_data.py; only {len(rows) - 12} instances exist)"

    if has("narrativeqa", "qaps.csv") and has("narrativeqa", "third_party", "wikipedia", "summaries.csv"):
        (helm_dir / "narrativeqa" / "data").mkdir(parents=True)
        link = helm_dir / "narrativeqa" / "data" / "narrativeqa-master"
        link.symlink_to(shared / "narrativeqa", target_is_directory=True)
        sources["narrative_qa"] = f"real ({shared / 'narrativeqa'})"
    else:
        stories = [demo.make_story(rng) for _ in range(instances + 20)]
        splits = {"train": stories[:20], "valid": [], "test": stories[20:]}
        demo.write_narrativeqa(helm_dir / "narrativeqa", splits, seed)
        sources["narrative_qa"] = "generated (demo_data.py)"
    return Data(helm_dir, Path(vocab_file), Path(merge_file), sources)


def convert_boolq(source: Path, data_dir: Path) -> None:
    """HELM's boolq files from the real dev split (HELM also needs a train split: the first items)."""
    data_dir.mkdir(parents=True)
    lines = source.joinpath("dev.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    data_dir.joinpath("train").write_text("".join(lines[:BOOLQ_TRAIN]), encoding="utf-8")
    data_dir.joinpath("dev").write_text("".join(lines[BOOLQ_TRAIN:]), encoding="utf-8")
    data_dir.joinpath("boolq_perturbed.jsonl").symlink_to(source / "boolq_perturbed.json")


def convert_hellaswag(source: Path, helm_dir: Path, train_rows: int = 20) -> None:
    """HELM's hellaswag jsonl from the llama.cpp text export: per task, ``<label>: <ctx>``, the gold index
    and four endings. The ctx_a/ctx_b split is lost there; HellaSwag's ctx_b is the unfinished last
    sentence, so it is taken as the text after the last ". " (HELM joins them with a space again)."""
    lines = bz2.decompress(source.read_bytes()).decode("utf-8").split("\n")
    rows = []
    for start in range(0, len(lines) - 5, 6):
        activity_label, ctx = lines[start].split(": ", 1)
        cut = ctx.rfind(". ")
        ctx_a, ctx_b = (ctx[: cut + 1], ctx[cut + 2 :]) if cut >= 0 else (ctx, "")
        endings = lines[start + 2 : start + 6]
        rows.append(
            {"activity_label": activity_label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx, "endings": endings,
             "label": int(lines[start + 1])}
        )  # fmt: skip
    import demo_data as demo

    demo.write_hellaswag(helm_dir / "hellaswag", {"train": rows[:train_rows], "val": rows[train_rows:]})


# --------------------------------------------------------------------------------------------------------
# The model, the exported copy and the three engines' set-up
# --------------------------------------------------------------------------------------------------------


def init_megatron() -> None:
    """A single-process Megatron world, TP = PP = 1, as backfill sets it up (CPU shims without CUDA)."""
    from demo_data import import_megatron

    import_megatron()
    from megatron_eval_hook.loading import ensure_single_process

    ensure_single_process(seed=0)


def padded_vocab(vocab_size: int, divisible_by: int = 128) -> int:
    """Megatron's padding of the embedding rows (--make-vocab-size-divisible-by 128, TP = 1)."""
    return math.ceil(vocab_size / divisible_by) * divisible_by


def build_model(
    vocab_size: int, arch: str, shape: dict[str, int], device: str, dtype: torch.dtype, seed: int = 0
) -> torch.nn.Module:
    """A Megatron GPT model with random weights and GPT-2's initialization (std 0.02), so greedy outputs vary
    with the prompt. "gpt2": learned absolute positions, LayerNorm, GELU, biases, tied embeddings. "llama":
    rotary positions (base 500000), RMSNorm, SwiGLU, grouped-query attention, no biases, untied embeddings."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(seed)
    common = dict(use_cpu_initialization=True, init_method_std=0.02)
    if arch == "llama":
        llama = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False)
        config = TransformerConfig(**shape, **common, **llama)
        spec, kind = get_gpt_layer_local_spec(normalization="RMSNorm"), dict(position_embedding_type="rope")
        kind.update(rotary_base=500000, share_embeddings_and_output_weights=False)
    else:
        config = TransformerConfig(**shape, **common)
        spec = get_gpt_layer_local_spec()
        kind = dict(position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True)
    model = GPTModel(config, spec, vocab_size=padded_vocab(vocab_size), max_sequence_length=CONTEXT, **kind)
    return model.to(device, dtype).eval()


def make_ours(model: torch.nn.Module, tokenizer: Any, batch_size: int) -> Any:
    """The hook's in-process model: the engine on the live GPTModel and the run's tokenizer."""
    from megatron_eval_hook.engine import Engine
    from megatron_eval_hook.helm.client import InProcessModel, MegatronTokenizer

    text = MegatronTokenizer(tokenizer)
    engine = Engine(
        model,
        vocab_size=tokenizer.vocab_size,
        max_sequence_length=CONTEXT,
        batch_size=batch_size,
        end_of_text=tokenizer.eod,
        decode=text.decode,
    )
    return InProcessModel(engine, text)


def export_hf(model: torch.nn.Module, data: Data, tokenizer: Any, folder: Path) -> Path:
    """The weights as a Hugging Face folder (GPT-2 or Llama model in float32, and the tokenizer), as
    `megatron-eval export-hf` writes it."""
    from megatron_eval_hook.export import gpt2_tokenizer, to_hf

    hf_tokenizer = gpt2_tokenizer(data.vocab_file, data.merge_file)
    to_hf(model, vocab_size=tokenizer.vocab_size, end_of_text=hf_tokenizer.eos_token_id).save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------------
# The requests: HELM's own RequestStates for each run
# --------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    benchmark: str
    kind: str  # SCORING or GENERATION
    spec: Any  # helm RunSpec
    states: list  # helm RequestState, unexecuted

    @property
    def label(self) -> str:
        """The run's name without the model."""
        return re.sub(r"[,:]model=[^,]*", "", self.spec.name)


class _Adapted(Exception):
    def __init__(self, scenario_state):
        self.scenario_state = scenario_state


def adapting_runner(helm_dir: Path) -> Any:
    """HELM's own Runner, stopped at the executor: `run_one` builds a run's RequestStates (scenario,
    downsampling, adapter, prompt fitting) and hands them over in `_Adapted`, unexecuted."""
    from helm.benchmark.executor import Executor

    class Stop(Executor):
        def execute(self, scenario_state):
            raise _Adapted(scenario_state)

    runner = plain_runner(helm_dir, "bench")
    runner.executor = Stop(runner.executor.execution_spec)
    return runner


def request_states(runner: Any, run_spec: Any) -> list:
    try:
        runner.run_one(run_spec)
    except _Adapted as adapted:
        return list(adapted.scenario_state.request_states)
    raise RuntimeError(f"HELM did not reach execution for {run_spec.name}")


def build_runs(data: Data, work: Path, instances: int, selected: Sequence[str]) -> list[Run]:
    """Every run's RequestStates, adapted for the in-process deployment (registered under "bench")."""
    from helm.benchmark.runner import set_benchmark_output_path

    from megatron_eval_hook.helm.benchmarks import Benchmark
    from megatron_eval_hook.helm.runner import HelmSuite

    benchmarks = [Benchmark(name, RUN_ENTRIES[name][1]) for name in selected]
    suite = HelmSuite(benchmarks, model_key="bench", data_dir=data.helm_dir, output_dir=work / "ours",
                      max_sequence_length=CONTEXT, max_eval_instances=instances)  # fmt: skip
    set_benchmark_output_path(str(suite.helm_dir))
    runner = adapting_runner(suite.helm_dir)
    runs = []
    for prepared in suite.benchmarks:
        kind = RUN_ENTRIES[prepared.name][0]
        share = math.ceil(instances / len(prepared.run_specs))  # MMLU: the instances spread over its subjects
        for spec in prepared.run_specs:
            spec = replace(spec, adapter_spec=replace(spec.adapter_spec, max_eval_instances=share))
            runs.append(Run(prepared.name, kind, spec, request_states(runner, spec)))
    return runs


def reference_text(state) -> str:
    return state.instance.references[state.reference_index].output.text


# --------------------------------------------------------------------------------------------------------
# The engines. Each one: `prepare(run)` (untimed) gives its input for the run, `execute(input)` (timed)
# answers it, `answers(run, results)` gives per state the log-probability HELM reads (scoring) or the
# completion text (generation).
# --------------------------------------------------------------------------------------------------------


class Ours:
    name = "ours"

    def __init__(self, model: Any, count_reference: Callable[[str], int]):
        self.model = model
        self.count_reference = count_reference

    def prepare(self, run: Run) -> tuple[list, str]:
        return run.states, run.spec.adapter_spec.method

    def execute(self, run_input: tuple[list, str]) -> list:
        """What the hook's executor does for one HELM run: prefetch its requests, then answer each."""
        states, method = run_input
        self.model.prefetch(states, method)
        try:
            return [self.model.answer(state.request) for state in states]
        finally:
            self.model.forget()

    def answers(self, run: Run, results: list) -> list:
        return helm_answers(run, results, self.count_reference)


class HelmHF:
    name = "helm_hf"

    def __init__(self, deployment: str, helm_dir: Path, threads: int, count_reference: Callable[[str], int]):
        from helm.benchmark.executor import ExecutionSpec, Executor
        from helm.common.authentication import Authentication

        self.deployment = deployment
        self.count_reference = count_reference
        # No sqlite or mongo cache backend: HELM's executor then caches nothing.
        spec = ExecutionSpec(
            url=None, auth=Authentication(""), local_path=str(helm_dir / "prod_env"), parallelism=threads
        )
        self.executor = Executor(spec)

    def prepare(self, run: Run) -> Any:
        """The run's ScenarioState, its requests addressed to the Hugging Face deployment."""
        from helm.benchmark.adaptation.scenario_state import ScenarioState

        address = {"model": self.deployment, "model_deployment": self.deployment}
        states = [replace(s, request=replace(s.request, **address)) for s in run.states]
        adapter_spec = replace(run.spec.adapter_spec, **address)
        return ScenarioState(adapter_spec=adapter_spec, request_states=states, annotator_specs=None)

    def execute(self, scenario_state: Any) -> list:
        return [state.result for state in self.executor.execute(scenario_state).request_states]

    def answers(self, run: Run, results: list) -> list:
        return helm_answers(run, results, self.count_reference)


def helm_answers(run: Run, results: list, count_reference: Callable[[str], int]) -> list:
    """Per state: the log-probability HELM's metric reads (the reference's last tokens), or the completion."""
    answers = []
    for state, result in zip(run.states, results, strict=True):
        if not result.success:
            raise RuntimeError(f"request failed: {result.error}")
        completion = result.completions[0]
        if run.kind == SCORING:
            tokens = completion.tokens[-count_reference(reference_text(state)) :]
            answers.append(sum(token.logprob for token in tokens))
        else:
            answers.append(completion.text)
    return answers


class LmEval:
    name = "lm_eval"

    def __init__(self, folder: Path, device: str, batch_size: int, dtype: str):
        from lm_eval.models.huggingface import HFLM

        self.lm = HFLM(pretrained=str(folder), device=device, batch_size=batch_size, dtype=dtype)

    def prepare(self, run: Run) -> tuple[str, list]:
        """loglikelihood (context, " " + reference) requests, or generate_until requests (greedy)."""
        from lm_eval.api.instance import Instance

        requests = []
        for index, state in enumerate(run.states):
            request = state.request
            if run.kind == SCORING:
                arguments = split_reference(request.prompt, reference_text(state))
                requests.append(Instance("loglikelihood", {}, arguments, index))
            else:
                options = {"until": list(request.stop_sequences), "max_gen_toks": request.max_tokens}
                options["do_sample"] = False  # greedy, as HELM asks (temperature 0)
                requests.append(Instance("generate_until", {}, (request.prompt, options), index))
        return run.kind, requests

    def execute(self, prepared: tuple[str, list]) -> list:
        kind, requests = prepared
        if kind == SCORING:
            return self.lm.loglikelihood(requests, disable_tqdm=True)
        return self.lm.generate_until(requests, disable_tqdm=True)

    def answers(self, run: Run, results: list) -> list:
        return [logprob for logprob, _ in results] if run.kind == SCORING else list(results)


def split_reference(prompt: str, reference: str) -> tuple[str, str]:
    """(context, continuation) for lm-eval: HELM's separate prompt is ``<input> <reference>``."""
    continuation = " " + reference
    if not prompt.endswith(continuation):
        raise ValueError(f"the prompt does not end with ' {reference}': {prompt[-80:]!r}")
    context = prompt[: -len(continuation)]
    assert context + continuation == prompt
    return context, continuation


# --------------------------------------------------------------------------------------------------------
# Timing, token counts, useful FLOPs
# --------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    seconds: float = 0.0
    requests: int = 0
    tokens: int = 0

    def add(self, other: Timing) -> None:
        self.seconds += other.seconds
        self.requests += other.requests
        self.tokens += other.tokens


class Clock:
    """Runs timed work in one worker thread (see the module docstring) and waits for the device."""

    def __init__(self, device: str):
        self.device = device
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench")

    def time(self, work: Callable[[], Any]) -> tuple[Any, float]:
        def timed():
            self._sync()
            started = time.perf_counter()
            result = work()
            self._sync()
            return result, time.perf_counter() - started

        return self.worker.submit(timed).result()

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def matmul_peak(
    clock: Clock, device: str, size: int, dtype: torch.dtype = torch.float32, repeats: int = 3
) -> tuple[float, dict[str, float]]:
    """FLOP/s of the best of `repeats` square matmuls of `size` in `dtype` on `device`, by every kernel at hand:
    PyTorch's matmul (MKL on CPU) and, on CPU in float32, oneDNN's, with the weight as it is and reordered into
    oneDNN's blocked layout as the engine keeps it. Returns the fastest and each kernel's rate."""
    from megatron_eval_hook.engine import onednn_linear

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    kernels = {"torch.matmul": lambda: a @ b}
    if device == "cpu" and dtype == torch.float32:
        for name, linear in (("oneDNN", onednn_linear(pack=False)), ("oneDNN reordered", onednn_linear())):
            if linear is not None:
                kernels[name] = lambda linear=linear: linear(a, b)  # a @ b^T: the same work
    rates = {}
    for name, kernel in kernels.items():
        clock.time(kernel)
        best = min(clock.time(kernel)[1] for _ in range(repeats))
        rates[name] = 2 * size**3 / best
    return max(rates.values()), rates


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    vocab: int
    non_embedding_params: int

    @classmethod
    def of(cls, model: torch.nn.Module, vocab: int) -> Shape:
        config = model.config
        return cls(config.num_layers, config.hidden_size, vocab, sum(p.numel() for p in model.decoder.parameters()))

    def position_flops(self, attended: int) -> float:
        return 2 * self.non_embedding_params + 4 * self.layers * self.hidden * attended

    @property
    def output_flops(self) -> float:
        return 2 * self.hidden * self.vocab


class UsefulWork:
    """Forward FLOPs of the minimal computation: a prefix trie over the fed token sequences."""

    def __init__(self, shape: Shape):
        self.shape = shape
        self.trie: dict = {}
        self.flops = 0.0
        self.positions = 0
        self.outputs = 0

    def add(self, tokens: Sequence[int], outputs_from: int) -> None:
        """Feed `tokens`; the next-token distribution is needed at positions >= `outputs_from`."""
        node = self.trie
        for position, token in enumerate(tokens):
            child = node.get(token)
            if child is None:
                child = node[token] = {}
                self.flops += self.shape.position_flops(position + 1)
                self.positions += 1
            if position >= outputs_from and None not in child:
                child[None] = True  # the output layer at this position, once
                self.flops += self.shape.output_flops
                self.outputs += 1
            node = child


def count_useful_work(work: UsefulWork, run: Run, answers: list, encode: Callable[[str], list[int]]) -> None:
    for state, answer in zip(run.states, answers, strict=True):
        prompt = encode(state.request.prompt)
        if run.kind == SCORING:
            read = len(encode(" " + reference_text(state)))
            work.add(prompt[:-1], outputs_from=len(prompt) - 1 - read)
        else:
            completion = encode(answer)
            stopped_early = len(completion) < state.request.max_tokens
            fed = completion if stopped_early else completion[:-1]
            work.add(prompt + fed, outputs_from=len(prompt) - 1)


def count_tokens(run: Run, answers: list, encode: Callable[[str], list[int]]) -> int:
    """Prompt tokens plus completion tokens, counted the same way for every engine."""
    prompts = sum(len(encode(state.request.prompt)) for state in run.states)
    return prompts + (sum(len(encode(a)) for a in answers) if run.kind == GENERATION else 0)


# --------------------------------------------------------------------------------------------------------
# Agreement between the engines
# --------------------------------------------------------------------------------------------------------


def compare(runs: list[Run], answers: dict[str, dict[str, list]]) -> list[str]:
    """One line per (engine, request type) against ours; "WARNING" lines where they disagree."""
    lines = []
    for engine in [e for e in answers if e != "ours"]:
        for kind in (SCORING, GENERATION):
            pairs = [
                (run, mine, theirs)
                for run in runs
                if run.kind == kind
                for mine, theirs in zip(answers["ours"][run.spec.name], answers[engine][run.spec.name])
            ]
            if not pairs:
                continue
            if kind == SCORING:
                gaps = [abs(mine - theirs) for _, mine, theirs in pairs]
                bad = sum(gap > LOGPROB_TOLERANCE for gap in gaps)
                detail = f"max |log-prob difference| {max(gaps):.2e}"
            else:
                bad = sum(mine != theirs for _, mine, theirs in pairs)
                first = next(((m, t) for _, m, t in pairs if m != t), None)
                detail = "identical completions" if first is None else f"first difference: {first[0]!r} vs {first[1]!r}"
            prefix = "WARNING: engines disagree:" if bad else "check:"
            lines.append(f"{prefix} {engine} vs ours, {kind}: {len(pairs) - bad}/{len(pairs)} agree ({detail})")
    return lines


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2", help="model architecture (default gpt2)")
    parser.add_argument("--size", choices=("small", "1b"), default="small", help="small: 124M-class; 1b: llama only")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights of every engine's model")
    parser.add_argument("--instances", type=int, default=None, help="instances per benchmark (default 100)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--benchmarks", default=",".join(RUN_ENTRIES), help="comma-separated subset (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (ours and lm_eval)")
    parser.add_argument("--helm-threads", type=int, default=HELM_DEFAULT_THREADS, help="HELM executor threads")
    parser.add_argument("--data-dir", type=Path, default=None, help="real data (default: ../shared/data if present)")
    parser.add_argument("--generated-data", action="store_true", help="only the demo generator's data and tokenizer")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep HELM's files here (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="smoke test: a 2-layer 128-wide model, 3 instances")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - set(ENGINES)
    if unknown or "ours" not in args.engines:
        parser.error(f"--engines must include ours and name only {', '.join(ENGINES)} (got {args.engines})")
    args.benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if not args.benchmarks or set(args.benchmarks) - set(RUN_ENTRIES):
        parser.error(f"--benchmarks: a subset of {', '.join(RUN_ENTRIES)} (got {args.benchmarks})")
    if args.instances is None:
        args.instances = 3 if args.quick else 100
    args.shape = SHAPES.get((args.arch, "tiny" if args.quick else args.size))
    if args.shape is None:
        parser.error(f"--size {args.size}: not for --arch {args.arch} (sizes: small; 1b for llama)")
    if args.generated_data:
        args.data_dir = None
    elif args.data_dir is None:
        args.data_dir = default_data_dir()
    if args.data_dir is not None:  # the HELM data folder links to it from elsewhere
        args.data_dir = args.data_dir.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    with tempfile.TemporaryDirectory(prefix="throughput-") as temporary:
        work = args.work_dir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        run_benchmark(args, work)


def quiet() -> None:
    """Keep the output to the benchmark's own lines: no import-time warnings, progress bars or INFO logs."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("lm_eval", "datasets", "megatron"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_benchmark(args: argparse.Namespace, work: Path) -> None:
    quiet()
    init_megatron()
    from demo_data import load_megatron_tokenizer, write_gpt2_dir

    from megatron_eval_hook.helm.client import register_model

    data = prepare_data(args.data_dir, work, args.instances)
    write_gpt2_dir(work)
    tokenizer = load_megatron_tokenizer(data.vocab_file, data.merge_file, work)
    encode = tokenizer.tokenize
    reference_lengths: dict[str, int] = {}

    def count_reference(text: str) -> int:  # HELM: len(tokenize(" " + reference))
        if text not in reference_lengths:
            reference_lengths[text] = len(encode(" " + text))
        return reference_lengths[text]

    model = build_model(tokenizer.vocab_size, args.arch, args.shape, args.device, DTYPES[args.dtype])
    shape = Shape.of(model, tokenizer.vocab_size)
    print(f"model: {args.arch} {args.shape}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
          f"({shape.non_embedding_params / 1e6:.1f}M non-embedding), {args.dtype}")  # fmt: skip
    ours = make_ours(model, tokenizer, args.batch_size)
    register_model("bench", ours)
    runs = build_runs(data, work, args.instances, args.benchmarks)

    engines: list[Any] = [Ours(ours, count_reference)]
    if {"helm_hf", "lm_eval"} & set(args.engines):
        folder = export_hf(model, data, tokenizer, work / "hf_model")
    if "helm_hf" in args.engines:
        deployment = register_hf_deployment(
            folder,
            name=f"bench/exported-{args.arch}",
            max_sequence_length=CONTEXT,
            device="cuda:0" if args.device == "cuda" else "cpu",
            dtype=args.dtype,
        )
        engines.append(HelmHF(deployment, work / "ours" / "helm", args.helm_threads, count_reference))
    if "lm_eval" in args.engines:
        engines.append(LmEval(folder, args.device, args.batch_size, args.dtype))

    clock = Clock(args.device)
    peak, kernels = matmul_peak(clock, args.device, 1024 if args.quick else 4096, DTYPES[args.dtype])
    print("matmul peak by kernel: " + ", ".join(f"{k} {r / 1e9:.1f} GFLOP/s" for k, r in kernels.items()))
    warm_up(clock, engines, runs)

    timings = {e.name: {b: Timing() for b in args.benchmarks} for e in engines}
    answers: dict[str, dict[str, list]] = {e.name: {} for e in engines}
    for run in runs:
        for engine in engines:
            prepared = engine.prepare(run)
            results, seconds = clock.time(lambda engine=engine, prepared=prepared: engine.execute(prepared))
            run_answers = engine.answers(run, results)
            answers[engine.name][run.spec.name] = run_answers
            timing = Timing(seconds, len(run.states), count_tokens(run, run_answers, encode))
            timings[engine.name][run.benchmark].add(timing)
            print(f"  {engine.name:8s} {run.label}: {len(run.states)} requests in {seconds:.2f} s", flush=True)

    useful = UsefulWork(shape)  # one trie for all runs: the RESULT line's figure
    by_benchmark = {b: UsefulWork(shape) for b in args.benchmarks}  # for the per-benchmark breakdown
    for run in runs:
        for work in (useful, by_benchmark[run.benchmark]):
            count_useful_work(work, run, answers["ours"][run.spec.name], encode)

    report(args, data, runs, timings, useful, by_benchmark, peak, compare(runs, answers))


def warm_up(clock: Clock, engines: list, runs: list[Run]) -> None:
    """A few requests of each type through every engine, untimed (model loading, first-call set-up)."""
    for kind in (SCORING, GENERATION):
        candidates = [run for run in runs if run.kind == kind and run.states]
        if not candidates:
            continue
        run = min(candidates, key=lambda r: max(s.request.max_tokens for s in r.states))
        sample = replace(run, states=run.states[:2])
        for engine in engines:
            prepared = engine.prepare(sample)
            clock.time(lambda engine=engine, prepared=prepared: engine.execute(prepared))


def report(
    args,
    data: Data,
    runs: list[Run],
    timings,
    useful: UsefulWork,
    by_benchmark: dict[str, UsefulWork],
    peak: float,
    checks: list[str],
) -> None:
    def per_kind(engine: str, kind: str) -> Timing:
        total = Timing()
        for benchmark in args.benchmarks:
            if RUN_ENTRIES[benchmark][0] == kind:
                total.add(timings[engine][benchmark])
        return total

    print()
    print(f"model {args.arch} ({'tiny' if args.quick else args.size}) in {args.dtype}, device {args.device}, "
          f"batch size {args.batch_size}, HELM executor threads {args.helm_threads}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    for part, source in data.sources.items():
        print(f"data: {part}: {source}")
    instances = {
        b: len({(r.spec.name, s.instance.id) for r in runs if r.benchmark == b for s in r.states})
        for b in args.benchmarks
    }
    print("instances: " + ", ".join(f"{b} {n}" for b, n in instances.items()))
    print()
    header = f"{'engine':8s} {'requests':23s} {'n':>6s} {'tokens':>9s} {'seconds':>9s} {'requests/s':>11s}"
    header += f" {'tokens/s':>10s}"
    print(header)
    print("-" * len(header))
    rows = [(b, RUN_ENTRIES[b][0]) for b in args.benchmarks]
    for engine in timings:
        for label, timing in [
            *((f"{kind}/{b}", timings[engine][b]) for b, kind in rows),
            *((f"{kind} (all)", per_kind(engine, kind)) for kind in (SCORING, GENERATION)),
        ]:
            if not timing.requests:
                continue
            seconds = timing.seconds or float("nan")
            print(f"{engine:8s} {label:23s} {timing.requests:6d} {timing.tokens:9d} {timing.seconds:9.2f} "
                  f"{timing.requests / seconds:11.2f} {timing.tokens / seconds:10.1f}")  # fmt: skip
    print()
    ratios = {}
    for kind in (SCORING, GENERATION):
        ours = per_kind("ours", kind)
        for engine in ("helm_hf", "lm_eval"):
            theirs = per_kind(engine, kind) if engine in timings else None
            ratio = theirs.seconds / ours.seconds if theirs and ours.seconds else float("nan")
            ratios[f"{kind}_vs_{engine}"] = ratio
            if theirs and ours.requests:
                print(f"{kind}: ours is {ratio:.2f}x {engine} ({ours.requests} identical requests)")
    ours_seconds = sum(per_kind("ours", kind).seconds for kind in (SCORING, GENERATION))
    util = useful.flops / ours_seconds / peak
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; useful work {useful.flops / 1e12:.3f} TFLOP "
          f"({useful.positions} distinct positions, output layer at {useful.outputs}) in {ours_seconds:.2f} s: "
          f"{useful.flops / ours_seconds / 1e9:.1f} GFLOP/s")  # fmt: skip
    print("useful work per benchmark, and the least time it needs at the matmul peak:")
    for benchmark, work in by_benchmark.items():
        ours = timings["ours"][benchmark].seconds
        print(f"  {benchmark:13s} {work.flops / 1e12:6.3f} TFLOP  at peak {work.flops / peak:6.2f} s  "
              f"ours {ours:6.2f} s  util {work.flops / peak / ours if ours else float('nan'):.3f}")  # fmt: skip
    for kind in (SCORING, GENERATION):
        least = sum(w.flops for b, w in by_benchmark.items() if RUN_ENTRIES[b][0] == kind) / peak
        for engine in ("helm_hf", "lm_eval"):
            if engine in timings and least:
                print(f"{kind}: even at the matmul peak, ours could be at most "
                      f"{per_kind(engine, kind).seconds / least:.2f}x {engine}")  # fmt: skip
    for line in checks:
        print(line)
    print(
        f"RESULT scoring_vs_helm_hf={ratios['scoring_vs_helm_hf']:.3f} "
        f"scoring_vs_lm_eval={ratios['scoring_vs_lm_eval']:.3f} "
        f"generation_vs_helm_hf={ratios['generation_vs_helm_hf']:.3f} "
        f"generation_vs_lm_eval={ratios['generation_vs_lm_eval']:.3f} "
        f"useful_flops_util={util:.4f}"
    )


if __name__ == "__main__":
    main()
