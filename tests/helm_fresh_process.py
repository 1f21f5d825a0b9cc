"""One evaluation of `HelmSuite` in a process of its own, for comparison with a warm process.

    python tests/helm_fresh_process.py SPEC.json

SPEC holds `model_key`, `weights` (a `tiny_gpt` state dict saved with torch.save), `data_dir`, `output_dir`,
`benchmarks`, `max_eval_instances`, `max_sequence_length` and `iteration`. Prints the outcome as
JSON: one [benchmark, metric, split, value, count] row per metric.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import CharTokenizer, tiny_gpt  # noqa: E402  (applies the CPU shims)


def main(spec_path: str) -> None:
    import torch

    from megatron_eval_hook.engine import Engine
    from megatron_eval_hook.helm.benchmarks import resolve_benchmarks
    from megatron_eval_hook.helm.client import InProcessModel, register_model
    from megatron_eval_hook.helm.runner import HelmSuite
    from megatron_eval_hook.loading import ensure_single_process

    spec = json.loads(Path(spec_path).read_text())
    ensure_single_process(seed=0)

    tokenizer = CharTokenizer()
    window = spec["max_sequence_length"]
    gpt = tiny_gpt(tokenizer.vocab_size, max_sequence_length=window)
    gpt.load_state_dict(torch.load(spec["weights"]))
    model = InProcessModel(
        Engine(
            gpt,
            vocab_size=tokenizer.vocab_size,
            max_sequence_length=window,
            batch_size=16,
            decode=tokenizer.decode,
        ),
        tokenizer,
    )
    register_model(spec["model_key"], model)
    suite = HelmSuite(
        resolve_benchmarks(spec["benchmarks"]),
        model_key=spec["model_key"],
        data_dir=spec["data_dir"],
        output_dir=spec["output_dir"],
        max_sequence_length=window,
        max_eval_instances=spec["max_eval_instances"],
    )
    rows = []
    for prepared, metrics, _ in suite.evaluate(model, iteration=spec["iteration"]):
        if isinstance(metrics, Exception):
            raise metrics
        rows += [[prepared.name, m.metric, m.split, m.value, m.count] for m in metrics]
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1])
