"""The ledger's size with per-instance values: a long run's worth of evaluations written as the hook writes them.

    python bench/ledger_size.py [--saves 1000] [--benchmarks 5] [--instances 100]

Writes `--saves` × `--benchmarks` ok evaluations, each with its main and four other metrics and the main
metric's value on each of `--instances` instances (HELM's ids, half of them right), through `Ledger`'s own
calls, into a temporary ledger; then times `results` (which computes every score's interval). Prints

    RESULT ledger_mb=<file size> bytes_per_instance=<file size / instance values> results_s=<seconds>
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from megatron_eval_hook.ledger import Ledger, MetricValue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=1000)
    parser.add_argument("--benchmarks", type=int, default=5)
    parser.add_argument("--instances", type=int, default=100)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ledger.sqlite"
        ledger = Ledger(path)
        for save in range(1, args.saves + 1):
            for b in range(args.benchmarks):
                attempt = ledger.begin("run", save * 1000, f"benchmark{b}", placement="sync", tokens=save * 10**9,
                                       main_metric="exact_match", main_split="test")  # fmt: skip
                values = [(f"id{rng.randrange(100_000)}_{i}", float(rng.random() < 0.5)) for i in range(args.instances)]
                metrics = [MetricValue("exact_match", "test", sum(v for _, v in values) / len(values), len(values))]
                metrics += [MetricValue(f"other{k}", "test", rng.random(), len(values)) for k in range(4)]
                ledger.finish_ok(attempt, metrics, 1.0, [values])
        size = path.stat().st_size
        started = time.perf_counter()
        rows = ledger.results()
        results_s = time.perf_counter() - started
    total = args.saves * args.benchmarks * args.instances
    print(f"{args.saves} saves x {args.benchmarks} benchmarks x {args.instances} instances: {len(rows)} scores")
    print(f"RESULT ledger_mb={size / 1e6:.1f} bytes_per_instance={size / total:.1f} results_s={results_s:.2f}")


if __name__ == "__main__":
    main()
