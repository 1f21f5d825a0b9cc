"""`megatron-eval`: command-line views of the ledger, and evaluation outside training.

megatron-eval results --ledger PATH [--run NAME] [--all-metrics | --summary] [--format table|json]
megatron-eval compare --ledger PATH --run A [--iteration I] [--vs-run B] [--vs-iteration J] [--format table|json]
megatron-eval baselines --config conf/baselines.yaml [--ledger PATH] [--no-wandb]
megatron-eval leaderboard --ledger PATH [--runs NAME ...] [--pick latest|best]
                          [--format table|markdown|csv|json] [--wandb]
megatron-eval report --ledger PATH --out report.html
megatron-eval backfill --checkpoints SAVE_DIR --config conf/helm.yaml [--override key=value ...]
    [--start N] [--end M] [--every K] [--follow [--poll-s S]]
megatron-eval check-data --config conf/helm.yaml [--override key=value ...] [--data-dir DIR]
megatron-eval prepare-data --config conf/helm.yaml [--override key=value ...] --data-dir DIR
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
    if args.summary:
        from megatron_eval_hook.trend import format_trends, trends

        found = trends(Ledger(path), run=args.run)
        if args.format == "json":
            print(json.dumps([t.to_json() for t in found], indent=2))
        else:
            print(format_trends(found) if found else f"no ok evaluations recorded in {path}")
        return 0
    rows = Ledger(path).results(run=args.run, all_metrics=args.all_metrics, running=True)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_table(rows))
    else:
        print(f"no evaluations recorded in {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from megatron_eval_hook.compare import CompareError, compare, format_comparisons

    ledger = _existing_ledger(args.ledger, "compare")
    if ledger is None:
        return 2
    vs_run = args.vs_run or args.run
    if vs_run == args.run and args.vs_iteration == args.iteration:
        print("megatron-eval compare: both sides name the same evaluation. Fix: give --vs-iteration or --vs-run.",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        comparisons = compare(ledger, args.run, args.iteration, vs_run, args.vs_iteration)
    except CompareError as error:
        print(f"megatron-eval compare: {error}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps([c.to_json() for c in comparisons], indent=2))
    else:
        a = f"{args.run} at " + (f"iteration {args.iteration}" if args.iteration is not None else "its latest")
        b = f"{vs_run} at " + (f"iteration {args.vs_iteration}" if args.vs_iteration is not None else "its latest")
        print(format_comparisons(comparisons, a, b))
    return 0


def _on_cpu_without_cuda() -> None:
    """The CPU shims where there is no CUDA device, before Megatron is imported: megatron-core imports CUDA-only
    modules (triton, Transformer Engine's) that a CPU machine lacks."""
    import torch

    if not torch.cuda.is_available():
        from megatron_eval_hook import cpu_shims

        cpu_shims.apply()


def _export_hf(args: argparse.Namespace) -> int:
    _on_cpu_without_cuda()
    from megatron_eval_hook.checkpoints import CheckpointError
    from megatron_eval_hook.export import NotExportable, export_checkpoint

    try:
        out = export_checkpoint(
            args.checkpoint,
            args.out,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            tokenizer_model=args.tokenizer_model,
        )
    except (FileNotFoundError, NotExportable, CheckpointError) as error:
        print(f"megatron-eval export-hf: {error}", file=sys.stderr)
        return 2
    model_type = json.loads((out / "config.json").read_text()).get("model_type", "?")
    print(f"wrote a Hugging Face {model_type} model and tokenizer to {out}")
    return 0


def _existing_ledger(path: str, command: str) -> Ledger | None:
    """The ledger at `path`, or None after saying on stderr that there is none (never creates one)."""
    if not Path(path).is_file():
        print(
            f"megatron-eval {command}: --ledger {path}: no such file. Fix: pass the ledger.sqlite the hook wrote "
            "(default <--save>/eval_hook/ledger.sqlite).",
            file=sys.stderr,
        )
        return None
    return Ledger(path)


def _wandb_failed(command: str, error: Exception) -> int:
    print(
        f"megatron-eval {command}: W&B logging failed: {error}. Fix: run `wandb login`, or set WANDB_MODE=offline "
        "and `wandb sync` later.",
        file=sys.stderr,
    )
    return 1


def _baselines(args: argparse.Namespace) -> int:
    from megatron_eval_hook.baselines import BaselinesError, load_baselines, log_baselines_to_wandb

    if args.ledger is None and not args.wandb:
        print(
            "megatron-eval baselines: nowhere to record. Fix: pass --ledger PATH, or drop --no-wandb.", file=sys.stderr
        )
        return 2
    try:
        scores = load_baselines(args.config)
    except BaselinesError as error:
        print(f"megatron-eval baselines: --config {error}", file=sys.stderr)
        return 2
    models = len({s.model for s in scores})
    if args.ledger is not None:
        Ledger(args.ledger).record_baselines(scores)
        print(f"recorded {len(scores)} scores of {models} baseline models in {args.ledger}")
    if args.wandb:
        try:
            folder = log_baselines_to_wandb(
                scores, project=args.wandb_project, entity=args.wandb_entity, directory=args.wandb_dir
            )
        except Exception as error:  # wandb raises many types (no API key, network); the ledger is written already
            return _wandb_failed("baselines", error)
        print(f"logged the baselines table to W&B project {args.wandb_project} ({folder})")
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    from megatron_eval_hook import leaderboard as lb

    ledger = _existing_ledger(args.ledger, "leaderboard")
    if ledger is None:
        return 2
    try:
        board = lb.build_leaderboard(
            ledger.results(),
            ledger.baselines(),
            runs=args.runs,
            pick=args.pick,
            chance=lb.parse_chance(args.chance),
            source=f"the ledger {args.ledger}",
        )
    except lb.LeaderboardError as error:
        print(f"megatron-eval leaderboard: {error}", file=sys.stderr)
        return 2
    formats = {"table": lb.to_text, "markdown": lb.to_markdown, "csv": lb.to_csv}
    if args.format == "json":
        print(json.dumps(board.to_json(), indent=2))
    elif board.rows:
        print(formats[args.format](board).rstrip("\n"))
    else:
        print(f"no evaluations or baselines recorded in {args.ledger}")
    if args.wandb:
        try:
            folder = lb.log_leaderboard_to_wandb(
                board, project=args.wandb_project, entity=args.wandb_entity, directory=args.wandb_dir
            )
        except Exception as error:  # wandb raises many types (no API key, network)
            return _wandb_failed("leaderboard", error)
        print(f"logged the leaderboard table to W&B project {args.wandb_project} ({folder})", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from megatron_eval_hook.leaderboard import LeaderboardError, build_leaderboard, parse_chance
    from megatron_eval_hook.report import render_report, write_report

    ledger = _existing_ledger(args.ledger, "report")
    if ledger is None:
        return 2
    rows, baselines = ledger.results(), ledger.baselines()
    try:
        board = build_leaderboard(rows, baselines, pick=args.pick, chance=parse_chance(args.chance))
    except LeaderboardError as error:
        print(f"megatron-eval report: {error}", file=sys.stderr)
        return 2
    from megatron_eval_hook.trend import trends

    html = render_report(rows, baselines, board, ledger_name=str(args.ledger), trends=trends(ledger, rows=rows),
                         alerts=ledger.alerts())  # fmt: skip
    print(f"wrote {write_report(args.out, html)}")
    return 0


def _add_wandb_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wandb-project", default="megatron-eval", help="W&B project (default: megatron-eval)")
    parser.add_argument("--wandb-entity", default=None, help="W&B entity (default: your default entity)")
    parser.add_argument("--wandb-dir", default=None, help="folder for W&B's local files (default: $WANDB_DIR or .)")


def _add_chance_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chance",
        action="append",
        default=[],
        metavar="BENCHMARK=LEVEL",
        help="random-guess score of a benchmark whose HELM scenario is not known, e.g. facts=0.25 (repeatable)",
    )


def _add_view_commands(commands: argparse._SubParsersAction) -> None:
    baselines = commands.add_parser("baselines", help="record published scores of other models (ledger and W&B)")
    baselines.add_argument("--config", required=True, help="baselines YAML, e.g. conf/baselines.yaml")
    baselines.add_argument("--ledger", default=None, help="ledger to record them in (created when missing)")
    baselines.add_argument("--no-wandb", dest="wandb", action="store_false", help="do not log them to W&B")
    _add_wandb_args(baselines)
    baselines.set_defaults(handler=_baselines)

    leaderboard = commands.add_parser("leaderboard", help="rank runs and baselines by a chance-corrected composite")
    leaderboard.add_argument("--ledger", required=True, help="path of the ledger (ledger.sqlite)")
    leaderboard.add_argument("--runs", nargs="+", default=None, metavar="NAME", help="only these runs")
    leaderboard.add_argument("--pick", choices=("latest", "best"), default="latest", help="which iteration of a run")
    leaderboard.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table")
    leaderboard.add_argument("--wandb", action="store_true", help="also log the leaderboard as a W&B Table")
    _add_chance_arg(leaderboard)
    _add_wandb_args(leaderboard)
    leaderboard.set_defaults(handler=_leaderboard)

    report = commands.add_parser("report", help="write a self-contained HTML report of the ledger")
    report.add_argument("--ledger", required=True, help="path of the ledger (ledger.sqlite)")
    report.add_argument("--out", required=True, help="HTML file to write, e.g. report.html")
    report.add_argument("--pick", choices=("latest", "best"), default="latest", help="leaderboard: which iteration")
    _add_chance_arg(report)
    report.set_defaults(handler=_report)


def _cli_config(args: argparse.Namespace):
    """The config named by --config and --override; ConfigError names those flags."""
    from megatron_eval_hook.config import load_config

    return load_config(args.config, args.override, flags=("--config", "--override"))


def _backfill(args: argparse.Namespace) -> int:
    from megatron_eval_hook.backfill import Backfill, backfill_schedule
    from megatron_eval_hook.checkpoints import CheckpointError, check_save_dir
    from megatron_eval_hook.config import ConfigError
    from megatron_eval_hook.log import log_to_stdout

    command = "megatron-eval backfill"
    try:
        save_dir = check_save_dir(args.checkpoints, "--checkpoints")
        config = _cli_config(args)
        schedule = backfill_schedule(config, args.start, args.end, args.every)
        if args.poll_s <= 0:
            raise ConfigError(f"--poll-s {args.poll_s} is not valid. Fix: poll every S > 0 seconds.")
    except (CheckpointError, ConfigError) as error:
        print(f"{command}: {error}", file=sys.stderr)
        return 2
    log_to_stdout("[backfill]", quiet_libraries=True)
    _on_cpu_without_cuda()  # evaluate on the CPU
    backfill = None
    try:
        backfill = Backfill(
            save_dir,
            config,
            schedule=schedule,
            where=f"--config {args.config}",
            tensorboard_dir=args.tensorboard_dir,
            tokenizer_paths={"vocab_file": args.vocab_file, "merge_file": args.merge_file},
        )
        if args.follow:
            backfill.follow(args.poll_s)
        else:
            backfill.run_once()
    except (CheckpointError, ConfigError) as error:
        print(f"{command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: stopped (Ctrl-C); the ledger holds every evaluation that finished", file=sys.stderr)
        return 130
    finally:
        if backfill is not None:
            backfill.close()
    if backfill.failures:
        print(
            f"{command}: {backfill.failures} benchmark evaluation(s) failed; the ledger says why "
            f"(megatron-eval results --ledger {backfill.ledger.path})",
            file=sys.stderr,
        )
        return 1
    return 0


def _benchmark_data(args: argparse.Namespace, command: str):
    """The config, and what its benchmarks read from data_dir; None after printing a config error."""
    import logging

    from megatron_eval_hook.config import ConfigError
    from megatron_eval_hook.helm.benchmarks import resolve_benchmarks
    from megatron_eval_hook.helm.runner import BenchmarkError, benchmark_data

    logging.getLogger("helm").setLevel(logging.WARNING)
    try:
        config = _cli_config(args)
        try:
            return config, benchmark_data(resolve_benchmarks(config.benchmarks, config.presets))
        except (ValueError, BenchmarkError) as error:
            raise ConfigError(f"--config {args.config}: benchmarks: {error}") from error
    except ConfigError as error:
        print(f"{command}: {error}", file=sys.stderr)
        return None


def _fetch_command(args: argparse.Namespace, data_dir: str = "DIR") -> str:
    overrides = "".join(f" --override '{o}'" for o in args.override)
    return f"megatron-eval prepare-data --config {args.config}{overrides} --data-dir {data_dir}"


def _check_data(args: argparse.Namespace) -> int:
    from megatron_eval_hook.helm.data import report

    found = _benchmark_data(args, "megatron-eval check-data")
    if found is None:
        return 2
    config, items = found
    data_dir = args.data_dir or config.data_dir
    text, complete = report(items, data_dir, _fetch_command(args))
    print(f"data_dir {data_dir} ({'--data-dir' if args.data_dir else 'data_dir of ' + args.config})\n{text}")
    return 0 if complete else 1


def _prepare_data(args: argparse.Namespace) -> int:
    from megatron_eval_hook.helm.data import fetch, report

    found = _benchmark_data(args, "megatron-eval prepare-data")
    if found is None:
        return 2
    _, items = found
    problems = fetch(items, args.data_dir)
    text, complete = report(items, args.data_dir, _fetch_command(args, args.data_dir))
    print(text)
    for problem in problems:
        print(f"megatron-eval prepare-data: {problem}", file=sys.stderr)
    return 0 if complete and not problems else 1


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the hook's YAML config (e.g. conf/helm.yaml)")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="Hydra override of one config key"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-eval", description="Views of the evaluation ledger, and evaluation outside training."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    results = commands.add_parser("results", help="print every recorded evaluation")
    results.add_argument("--ledger", required=True, help="path of the ledger (ledger.sqlite)")
    results.add_argument("--run", default=None, help="only this run")
    results.add_argument("--all-metrics", action="store_true", help="every metric, not only each main metric")
    results.add_argument(
        "--summary", action="store_true", help="per benchmark: its noise, its trend over the run, and a verdict"
    )
    results.add_argument("--format", choices=("table", "json"), default="table")
    results.set_defaults(handler=_results)
    paired = commands.add_parser("compare", help="is a change real? two evaluations compared on the same instances")
    paired.add_argument("--ledger", required=True, help="path of the ledger (ledger.sqlite)")
    paired.add_argument("--run", required=True, help="side A's run")
    paired.add_argument("--iteration", type=int, default=None, help="side A's iteration (default: its latest)")
    paired.add_argument("--vs-run", default=None, help="side B's run (default: --run)")
    paired.add_argument("--vs-iteration", type=int, default=None, help="side B's iteration (default: its latest)")
    paired.add_argument("--format", choices=("table", "json"), default="table")
    paired.set_defaults(handler=_compare)
    export = commands.add_parser("export-hf", help="write a GPT-2 or Llama checkpoint as a Hugging Face folder")
    export.add_argument("--checkpoint", required=True, help="torch_dist save folder or one of its iter_* folders")
    export.add_argument("--out", required=True, help="folder for the Hugging Face model and tokenizer")
    export.add_argument("--vocab-file", default=None, help="GPT-2 BPE vocab.json (default: the checkpoint's)")
    export.add_argument("--merge-file", default=None, help="GPT-2 BPE merges.txt (default: the checkpoint's)")
    export.add_argument(
        "--tokenizer-model", default=None, help="HuggingFaceTokenizer's folder or name (default: the checkpoint's)"
    )
    export.set_defaults(handler=_export_hf)
    _add_view_commands(commands)
    backfill = commands.add_parser("backfill", help="evaluate checkpoints already on disk, as the hook would have")
    backfill.add_argument("--checkpoints", required=True, help="the run's --save folder (torch_dist checkpoints)")
    _add_config_flags(backfill)
    backfill.add_argument("--start", type=int, default=None, help="first iteration (default: schedule.start)")
    backfill.add_argument("--end", type=int, default=None, help="last iteration (default: schedule.end)")
    backfill.add_argument("--every", type=int, default=None, help="every K iterations from --start (default: all)")
    backfill.add_argument("--follow", action="store_true", help="keep evaluating new saves until --end or Ctrl-C")
    backfill.add_argument("--poll-s", type=float, default=60.0, help="seconds between looks for new saves")
    backfill.add_argument("--tensorboard-dir", default=None, help="TensorBoard folder (default: the run's)")
    backfill.add_argument("--vocab-file", default=None, help="tokenizer vocab (default: the checkpoint's)")
    backfill.add_argument("--merge-file", default=None, help="tokenizer merges (default: the checkpoint's)")
    backfill.set_defaults(handler=_backfill)
    check = commands.add_parser("check-data", help="check offline that every configured benchmark has its data")
    _add_config_flags(check)
    check.add_argument("--data-dir", default=None, help="the folder to check (default: the config's data_dir)")
    check.set_defaults(handler=_check_data)
    prepare = commands.add_parser("prepare-data", help="download every configured benchmark's data with HELM")
    _add_config_flags(prepare)
    prepare.add_argument("--data-dir", required=True, help="the folder to fill (HELM's layout)")
    prepare.set_defaults(handler=_prepare_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_eval_hook.ledger import LedgerUnusable

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except LedgerUnusable as error:  # every command's --ledger
        print(f"megatron-eval {args.command}: --ledger {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
