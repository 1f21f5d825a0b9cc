"""HELM's fixed cost per evaluation in a warm process: everything but the model's own compute.

    python bench/overhead.py [--evaluations 5] [--seq-length 1024] [--profile FILE]

In one process: the demo's generated HELM data (examples/pretrain_gpt2/demo_data.py) in a temporary
folder, the demo's BPE tokenizer, and the project's config defaults (conf/helm.yaml: `benchmarks:
[default]`, `max_eval_instances`, `engine.batch_size`). A `HelmSuite` is built once, as the hook builds it
at install, then evaluates "checkpoints" as the hook does after each save (a fresh `InProcessModel`,
registered under the run's key, then `HelmSuite.evaluate` at a new iteration, so a new HELM suite): one
warm-up evaluation, then `--evaluations` measured ones.

The model is a stand-in engine whose answers cost next to nothing: it scores every token with a
deterministic pseudo log-probability and "generates" a stretch of the prompt's own tokens (up to the
request's token budget, ending early at a stop sequence, as the real engine does). The point is to
measure everything except model compute; a real tiny GPTModel would add tens of seconds of model time per
evaluation on a CPU, whose noise would swamp the subtraction. The answers still have the real
shapes (multiple-choice letters, sentences up to NarrativeQA's 100 tokens), so HELM's metrics do their
real work on them. Time inside the engine (`score`, `generate`) is measured and subtracted anyway.

Per evaluation it prints the wall time, the time inside the engine and the rest (HELM's scenario loading,
adaptation, metrics, file writing and the suite's own bookkeeping), per benchmark too. The last line is
`RESULT helm_overhead_s=<median over the measured evaluations of (total - model time)>`.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "pretrain_gpt2"))

from megatron_eval_hook import cpu_shims  # noqa: E402
from megatron_eval_hook.config import load_config  # noqa: E402
from megatron_eval_hook.engine import LENGTH, STOP, Generation, GenerationRequest  # noqa: E402
from megatron_eval_hook.helm.benchmarks import resolve_benchmarks  # noqa: E402
from megatron_eval_hook.helm.client import InProcessModel, MegatronTokenizer, register_model  # noqa: E402
from megatron_eval_hook.helm.runner import HelmSuite  # noqa: E402

MODEL_KEY = "overhead-bench"


class TrivialEngine:
    """The `Engine` interface (`score`, `generate`) with answers that cost ~nothing; counts its own time.

    Like the engine, `score` computes only the tokens from `needed_from` on; the others get 0.0."""

    def __init__(self, max_sequence_length: int, decode):
        self.max_sequence_length = max_sequence_length
        self.decode = decode  # token ids -> text, to find stop sequences
        self.seconds = 0.0

    def score(self, sequences: Sequence[Sequence[int]], needed_from: Sequence[int] | None = None) -> list[list[float]]:
        started = time.perf_counter()
        starts = list(needed_from) if needed_from is not None else [1] * len(sequences)
        try:
            return [self._score(sequence, start) for sequence, start in zip(sequences, starts)]
        finally:
            self.seconds += time.perf_counter() - started

    @staticmethod
    def _score(sequence: Sequence[int], start: int) -> list[float]:
        pseudo = [-0.5 - ((t * 7919 + p * 104729) % 997) / 199.0 for p, t in zip(sequence, sequence[1:])]
        return [0.0] + [logprob if i >= start else 0.0 for i, logprob in enumerate(pseudo, start=1)]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        started = time.perf_counter()
        try:
            return [self._generate(r, self.decode) for r in requests]
        finally:
            self.seconds += time.perf_counter() - started

    @staticmethod
    def _generate(request: GenerationRequest, decode) -> Generation:
        prompt = list(request.prompt) or [0]
        start = zlib.crc32(str(prompt[-16:]).encode()) % len(prompt)
        tokens: list[int] = []
        reason = LENGTH
        while len(tokens) < request.max_new_tokens:
            tokens.append(prompt[(start + len(tokens)) % len(prompt)])
            if request.stop_sequences and any(stop in decode(tokens) for stop in request.stop_sequences):
                reason = STOP
                break
        return Generation(tokens, [-1.0] * len(tokens), reason)


def evaluate_once(suite: HelmSuite, tokenizer, max_sequence_length: int, iteration: int):
    """One evaluation as the hook runs it after a save: (wall s, CPU s, model s, {benchmark: (s, main score)})."""
    started, cpu_started = time.perf_counter(), time.process_time()
    text = MegatronTokenizer(tokenizer)
    engine = TrivialEngine(max_sequence_length, text.decode)
    model = InProcessModel(engine, text)  # type: ignore[arg-type]
    register_model(MODEL_KEY, model)
    results = {}
    for prepared, outcome, seconds in suite.evaluate(model, iteration):
        if isinstance(outcome, Exception):
            raise RuntimeError(f"benchmark {prepared.name} failed: {outcome}") from outcome
        main = [m.value for m in outcome if (m.metric, m.split) == (prepared.main_metric, prepared.main_split)]
        results[prepared.name] = (seconds, main[0])
    return time.perf_counter() - started, time.process_time() - cpu_started, engine.seconds, results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluations", type=int, default=5, help="measured evaluations after the warm-up")
    parser.add_argument(
        "--seq-length", type=int, default=1024, help="context window (--seq-length of the GPU example; default 1024)"
    )
    parser.add_argument("--config", default=str(ROOT / "conf" / "helm.yaml"), help="hook config (default: defaults)")
    parser.add_argument("--override", action="append", default=[], help="config override key=value (repeatable)")
    parser.add_argument("--out", type=Path, help="folder for data and HELM outputs (default: a temporary one)")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the measured evaluations here")
    args = parser.parse_args(argv)

    cpu_shims.apply()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO)  # as Megatron sets it
    from demo_data import load_megatron_tokenizer, make_demo_data

    with tempfile.TemporaryDirectory(prefix="helm-overhead-") as temporary:
        out = args.out or Path(temporary)
        started = time.perf_counter()
        data = make_demo_data(out / "data")
        tokenizer = load_megatron_tokenizer(data.vocab_file, data.merge_file, data.root)
        config = load_config(args.config, [*args.override, f"data_dir={data.helm_dir}"])
        window = config.engine.max_sequence_length or args.seq_length
        print(f"demo data and tokenizer: {time.perf_counter() - started:.1f} s")

        started = time.perf_counter()
        suite = HelmSuite(
            resolve_benchmarks(config.benchmarks, config.presets),
            model_key=MODEL_KEY,
            data_dir=config.data_dir,
            output_dir=out / "eval",
            max_sequence_length=window,
            max_eval_instances=config.max_eval_instances,
            num_train_trials=config.num_train_trials,
        )
        runs = sum(len(p.run_specs) for p in suite.benchmarks)
        print(
            f"suite: {[p.name for p in suite.benchmarks]}, {runs} HELM runs, max_eval_instances "
            f"{config.max_eval_instances}, context {window} tokens, "
            f"set up in {time.perf_counter() - started:.1f} s"
        )

        profiler = cProfile.Profile() if args.profile else None
        overheads, totals, models, scores = [], [], [], []
        for index in range(args.evaluations + 1):
            iteration = 1000 * (index + 1)
            if profiler is not None and index > 0:
                profiler.enable()
            total, cpu, model, results = evaluate_once(suite, tokenizer, window, iteration)
            if profiler is not None:
                profiler.disable()
            label = "warm-up" if index == 0 else f"eval {index}"
            per_benchmark = ", ".join(f"{name} {s:.2f} s" for name, (s, _) in results.items())
            print(
                f"{label:>8} (iteration {iteration}): total {total:.3f} s = model {model:.3f} s + "
                f"rest {total - model:.3f} s (process CPU {cpu:.3f} s)  [{per_benchmark}]"
            )
            scores.append({name: score for name, (_, score) in results.items()})
            if index > 0:
                totals.append(total)
                models.append(model)
                overheads.append(total - model)

        print("main scores:", ", ".join(f"{name} {value:.4f}" for name, value in scores[0].items()))
        if any(s != scores[0] for s in scores):
            raise SystemExit(f"scores differ between evaluations of the same model: {scores}")
        if profiler is not None:
            profiler.dump_stats(args.profile)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
        print(
            f"median of {len(overheads)}: total {statistics.median(totals):.3f} s, model "
            f"{statistics.median(models):.3f} s, rest {statistics.median(overheads):.3f} s "
            f"(min {min(overheads):.3f}, max {max(overheads):.3f})"
        )
        print(f"RESULT helm_overhead_s={statistics.median(overheads):.3f}")


if __name__ == "__main__":
    main()
