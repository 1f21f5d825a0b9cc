"""`megatron-eval`: command-line views of the ledger.

megatron-eval results --ledger PATH [--run NAME] [--all-metrics] [--format table|json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_eval_hook.ledger import Ledger

_TABLE_COLUMNS = ("run", "iteration", "benchmark", "metric", "value", "status", "duration_s", "error")


def _format_cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def format_table(rows: list[dict], columns: Sequence[str] = _TABLE_COLUMNS) -> str:
    """Rows as a plain-text table with aligned columns."""
    cells = [[_format_cell(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _results(args: argparse.Namespace) -> int:
    path = Path(args.ledger)
    if not path.is_file():
        print(
            f"megatron-eval results: no ledger at {path}. Fix: pass the ledger.sqlite the hook wrote "
            "(default <--save>/eval_hook/ledger.sqlite).",
            file=sys.stderr,
        )
        return 2
    rows = Ledger(path).results(run=args.run, all_metrics=args.all_metrics)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_table(rows))
    else:
        print(f"no evaluations recorded in {path}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from megatron_eval_hook.export import NotGPT2, export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, vocab_file=args.vocab_file, merge_file=args.merge_file)
    except (FileNotFoundError, NotGPT2) as error:
        print(f"megatron-eval export-hf: {error}", file=sys.stderr)
        return 2
    print(f"wrote a Hugging Face GPT-2 model and tokenizer to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-eval", description="Views of the evaluation ledger.")
    commands = parser.add_subparsers(dest="command", required=True)
    results = commands.add_parser("results", help="print every recorded evaluation")
    results.add_argument("--ledger", required=True, help="path of the ledger (ledger.sqlite)")
    results.add_argument("--run", default=None, help="only this run")
    results.add_argument("--all-metrics", action="store_true", help="every metric, not only each main metric")
    results.add_argument("--format", choices=("table", "json"), default="table")
    results.set_defaults(handler=_results)
    export = commands.add_parser("export-hf", help="write a GPT-2 checkpoint as a Hugging Face model folder")
    export.add_argument("--checkpoint", required=True, help="torch_dist save folder or one of its iter_* folders")
    export.add_argument("--out", required=True, help="folder for the Hugging Face model and tokenizer")
    export.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json (default: the checkpoint's)")
    export.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (default: the checkpoint's)")
    export.set_defaults(handler=_export_hf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
