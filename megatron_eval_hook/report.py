"""The HTML report: one self-contained file (inline CSS, SVG and script; nothing fetched) of the ledger.

For each benchmark, its main metric against iteration and against training tokens, one line per
run in a band of each score's 95% interval (where the ledger holds per-instance values) and
baselines as horizontal reference lines; the leaderboard; evaluation and blocked time per
save; the failed and skipped evaluations with their reasons. Every text taken from the ledger is
escaped, and every plotted point carries its values as `data-*` attributes and a `<title>`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from megatron_eval_hook.leaderboard import Leaderboard, display_rows, format_count
from megatron_eval_hook.ledger import BaselineScore
from megatron_eval_hook.trend import Trend

_WIDTH, _HEIGHT = 640, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 150, 16, 40  # plot margins; the right one holds baseline labels
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f")

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.partial td { background: #fff6e0; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figcaption { font-weight: 600; }
svg { background: #fff; border: 1px solid #eee; }
.axis { stroke: #444; } .grid { stroke: #eee; } .tick { font-size: 11px; fill: #444; }
.series polyline { fill: none; stroke-width: 1.5; }
.series polygon.band { stroke: none; fill-opacity: 0.15; }
.baseline line { stroke-dasharray: 5 4; stroke-width: 1; }
.baseline text { font-size: 11px; }
.hidden { display: none; }
.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 0.5em; }
.legend button { border: 1px solid #ccc; background: #fafafa; cursor: pointer; }
.legend button.off { opacity: 0.4; }
.note { color: #666; }
pre.reason { white-space: pre-wrap; margin: 0; max-width: 60em; }
"""

# Clicking a run in a legend hides or shows that run's lines in every chart.
_SCRIPT = """
document.querySelectorAll(".legend button").forEach(function (button) {
  button.addEventListener("click", function () {
    var run = button.dataset.run;
    var off = !button.classList.contains("off");
    document.querySelectorAll(".legend button").forEach(function (other) {
      if (other.dataset.run === run) { other.classList.toggle("off", off); }
    });
    document.querySelectorAll("g.series").forEach(function (series) {
      if (series.dataset.run === run) { series.classList.toggle("hidden", off); }
    });
  });
});
"""


@dataclass(frozen=True)
class Point:
    run: str
    benchmark: str
    metric: str
    iteration: int
    tokens: int | None
    value: float
    ci_low: float | None = None  # the score's 95% interval (uncertainty.py), when known
    ci_high: float | None = None


def _attrs(**attributes: Any) -> str:
    """HTML attributes, escaped; `data_x` becomes `data-x`, `class_` `class`; None values are left out."""
    return "".join(
        f' {name.rstrip("_").replace("_", "-")}="{escape(str(value), quote=True)}"'
        for name, value in attributes.items()
        if value is not None
    )


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _domain(values: Sequence[float], pad: float) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low < 1e-12:
        spread = abs(low) * 0.1 or 1.0
        return low - spread, high + spread
    margin = (high - low) * pad
    return low - margin, high + margin


def _number(value: float) -> str:
    return f"{value:.4g}"


def _chart(axis: str, points: Sequence[Point], baselines: Sequence[BaselineScore], colours: Mapping[str, str]) -> str:
    """One SVG line chart of `points` against `axis` ("iteration" or "tokens"), baselines as dashed lines."""
    x_of: Callable[[Point], float] = (lambda p: p.iteration) if axis == "iteration" else (lambda p: p.tokens)
    x_label = format_count if axis == "tokens" else (lambda v: f"{v:g}")
    x_low, x_high = _domain([x_of(p) for p in points], 0.02)
    bounds = [v for p in points for v in (p.ci_low, p.ci_high) if v is not None]
    y_low, y_high = _domain([p.value for p in points] + bounds + [b.value for b in baselines], 0.08)
    inner_w, inner_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def sx(x: float) -> float:
        return _LEFT + (x - x_low) / (x_high - x_low) * inner_w

    def sy(y: float) -> float:
        return _TOP + (y_high - y) / (y_high - y_low) * inner_h

    parts = [
        f"<svg{_attrs(viewBox=f'0 0 {_WIDTH} {_HEIGHT}', width=_WIDTH, height=_HEIGHT, role='img')}"
        f"{_attrs(data_y_low=repr(y_low), data_y_high=repr(y_high), data_top=_TOP, data_height=inner_h)}>"
    ]
    for y in _ticks(y_low, y_high):
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_LEFT + inner_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}"/>')
        parts.append(f'<text class="tick" x="{_LEFT - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for x in _ticks(x_low, x_high):
        parts.append(
            f'<text class="tick" x="{sx(x):.1f}" y="{_TOP + inner_h + 16}" text-anchor="middle">{x_label(x)}</text>'
        )
    parts.append(f'<line class="axis" x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" y2="{_TOP + inner_h}"/>')
    parts.append(
        f'<line class="axis" x1="{_LEFT}" x2="{_LEFT + inner_w}" y1="{_TOP + inner_h}" y2="{_TOP + inner_h}"/>'
    )
    parts.append(
        f'<text class="tick" x="{_LEFT + inner_w / 2:.1f}" y="{_HEIGHT - 6}" text-anchor="middle">{escape(axis)}</text>'
    )
    ordered = sorted(baselines, key=lambda b: -b.value)
    label_ys = _spread([sy(b.value) + 4 for b in ordered], gap=12)
    parts += [_baseline_line(b, sy(b.value), label_y, _LEFT, _LEFT + inner_w) for b, label_y in zip(ordered, label_ys)]
    for run in dict.fromkeys(p.run for p in points):
        series = sorted((p for p in points if p.run == run), key=x_of)
        parts.append(_series(run, series, colours[run], lambda p: (sx(x_of(p)), sy(p.value)), sy))
    parts.append("</svg>")
    return "".join(parts)


def _spread(ys: Sequence[float], gap: float) -> list[float]:
    """Ascending label positions `ys` moved down just enough to be `gap` apart."""
    spread: list[float] = []
    for y in ys:
        spread.append(max(y, spread[-1] + gap) if spread else y)
    return spread


def _baseline_line(baseline: BaselineScore, y: float, label_y: float, x1: float, x2: float) -> str:
    label = f"{baseline.model} {_number(baseline.value)}"
    return (
        f'<g class="baseline"{_attrs(data_baseline=baseline.model, data_value=repr(baseline.value))}>'
        f'<line x1="{x1}" x2="{x2}" y1="{y:.1f}" y2="{y:.1f}" stroke="#555"/>'
        f'<text x="{x2 + 4}" y="{label_y:.1f}">{escape(label)}</text>'
        f"<title>{escape(f'baseline {label} ({baseline.metric})')}</title></g>"
    )


def _series(
    run: str,
    points: Sequence[Point],
    colour: str,
    xy: Callable[[Point], tuple[float, float]],
    sy: Callable[[float], float],
) -> str:
    coordinates = [xy(p) for p in points]
    polyline = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
    circles = "".join(
        f'<circle class="point"{_attrs(cx=f"{x:.1f}", cy=f"{y:.1f}", r=3.5, fill=colour)}'
        f"{_attrs(data_run=p.run, data_benchmark=p.benchmark, data_metric=p.metric, data_iteration=p.iteration)}"
        f"{_attrs(data_tokens=p.tokens, data_value=repr(p.value))}"
        f"{_attrs(data_ci_low=_maybe_repr(p.ci_low), data_ci_high=_maybe_repr(p.ci_high))}>"
        f"<title>{escape(_point_title(p))}</title></circle>"
        for p, (x, y) in zip(points, coordinates)
    )
    band = _band([(x, p) for p, (x, _) in zip(points, coordinates)], colour, sy)
    return (
        f'<g class="series"{_attrs(data_run=run)}>{band}<polyline points="{polyline}" stroke="{colour}"/>{circles}</g>'
    )


def _band(points: Sequence[tuple[float, Point]], colour: str, sy: Callable[[float], float]) -> str:
    """The polygon through the upper ends of the points' intervals, then back through their lower ends (the
    points with an interval; a lone one gets a thin bar)."""
    known = [(x, p) for x, p in points if p.ci_low is not None and p.ci_high is not None]
    if not known:
        return ""
    if len(known) == 1:
        (x, p), width = known[0], 3.0
        known = [(x - width, p), (x + width, p)]
    upper = [f"{x:.1f},{sy(p.ci_high):.1f}" for x, p in known]
    lower = [f"{x:.1f},{sy(p.ci_low):.1f}" for x, p in reversed(known)]
    return f'<polygon class="band" points="{" ".join(upper + lower)}" fill="{colour}"/>'


def _maybe_repr(value: float | None) -> str | None:
    return None if value is None else repr(value)


def _point_title(point: Point) -> str:
    tokens = f", {format_count(point.tokens)} tokens" if point.tokens is not None else ""
    interval = f" (95% {_number(point.ci_low)}-{_number(point.ci_high)})" if point.ci_low is not None else ""
    return f"{point.run}: {point.metric} {_number(point.value)}{interval} at iteration {point.iteration}{tokens}"


def _legend(runs: Sequence[str], colours: Mapping[str, str]) -> str:
    items = "".join(
        f'<li><button type="button"{_attrs(data_run=run, style=f"color: {colours[run]}")}>{escape(run)}</button></li>'
        for run in runs
    )
    return f'<ul class="legend">{items}</ul>'


def _benchmark_section(
    benchmark: str, metric: str, points: Sequence[Point], baselines: Sequence[BaselineScore], colours: Mapping[str, str]
) -> str:
    figures = [
        f"<figure{_attrs(data_benchmark=benchmark, data_axis='iteration')}>"
        f"<figcaption>{escape(benchmark)}: {escape(metric)} against iteration</figcaption>"
        f"{_chart('iteration', points, baselines, colours)}</figure>"
    ]
    with_tokens = [p for p in points if p.tokens is not None]
    if with_tokens:
        figures.append(
            f"<figure{_attrs(data_benchmark=benchmark, data_axis='tokens')}>"
            f"<figcaption>{escape(benchmark)}: {escape(metric)} against training tokens</figcaption>"
            f"{_chart('tokens', with_tokens, baselines, colours)}</figure>"
        )
    else:
        figures.append('<p class="note">No training-token counts recorded for this benchmark.</p>')
    runs = list(dict.fromkeys(p.run for p in points))
    return f'<h3>{escape(benchmark)}</h3>{_legend(runs, colours)}<div class="charts">{"".join(figures)}</div>'


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[str] = (), **attributes) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{escape(str(v))}</td>' if c in numeric else f"<td>{escape(str(v))}</td>"
            for c, v in zip(columns, row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table{_attrs(**attributes)}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _leaderboard_section(leaderboard: Leaderboard) -> str:
    columns = leaderboard.columns()
    numeric = {"rank", "iteration", "tokens", "composite", "± se", *leaderboard.benchmarks}
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        f"<tr{_attrs(class_='partial' if leaderboard.is_partial(row) else None)}>"
        + "".join(
            f'<td class="num">{escape(v)}</td>' if c in numeric else f"<td>{escape(v)}</td>"
            for c, v in zip(columns, cells)
        )
        + "</tr>"
        for row, cells in zip(leaderboard.rows, display_rows(leaderboard))
    )
    notes = "".join(f"<li>{escape(note)}</li>" for note in leaderboard.notes())
    return (
        f'<table id="leaderboard"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f'<ul class="note">{notes}</ul>'
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _timing_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Per save (run, iteration): benchmarks ok / not ok, evaluation time (sum), blocked time."""
    saves: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["main"] or row["status"] != "ok":
            saves.setdefault((row["run"], row["iteration"]), []).append(row)
    table = []
    for (run, iteration), attempts in saves.items():
        ok = sum(a["status"] == "ok" for a in attempts)
        durations = [a["duration_s"] for a in attempts if a["duration_s"] is not None]
        blocked = [a["blocked_s"] for a in attempts if a["blocked_s"] is not None]
        tokens = next((a["tokens"] for a in attempts if a["tokens"] is not None), None)
        table.append(
            [
                run,
                iteration,
                format_count(tokens),
                ok,
                len(attempts) - ok,
                _seconds(sum(durations) if durations else None),
                _seconds(max(blocked) if blocked else None),
            ]
        )
    return table


def render_report(
    rows: Sequence[Mapping[str, Any]],
    baselines: Sequence[BaselineScore],
    leaderboard: Leaderboard,
    *,
    ledger_name: str,
    generated_at: str | None = None,
    trends: Sequence[Trend] = (),
    alerts: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The report's HTML for the ledger `rows` (`Ledger.results()`), `baselines` and `leaderboard`, with each
    benchmark's signal against noise (`trend.trends`) and the regression alerts (`Ledger.alerts`)."""
    points = [
        Point(
            r["run"],
            r["benchmark"],
            r["metric"],
            r["iteration"],
            r["tokens"],
            r["value"],
            r.get("ci_low"),
            r.get("ci_high"),
        )  # fmt: skip
        for r in rows
        if r["status"] == "ok" and r["main"] and r["value"] is not None
    ]
    runs = list(dict.fromkeys(r["run"] for r in rows))
    colours = {run: _COLOURS[i % len(_COLOURS)] for i, run in enumerate(runs)}
    charted = dict.fromkeys(p.benchmark for p in points)
    sections = []
    for benchmark in charted:
        at = [p for p in points if p.benchmark == benchmark]
        metric = leaderboard.metrics.get(benchmark, at[0].metric)
        references = [b for b in baselines if b.benchmark == benchmark and b.metric == metric]
        sections.append(_benchmark_section(benchmark, metric, at, references, colours))
    problems = [
        [r["run"], r["iteration"], r["benchmark"], r["status"], r["started_at"], r["error"] or ""]
        for r in rows
        if r["status"] != "ok"
    ]
    generated_at = generated_at or datetime.now(UTC).isoformat(timespec="seconds")
    summary = f"{len(runs)} runs, {len(points)} scores, {len(problems)} failed or skipped evaluations"
    body = [
        "<h1>Evaluation report</h1>",
        f'<p class="note">Ledger {escape(ledger_name)}, generated {escape(generated_at)}: {escape(summary)}.</p>',
        "<h2>Scores</h2>",
        "".join(sections) or '<p class="note">No successful evaluation recorded yet.</p>',
        "<h2>Signal and noise</h2>",
        _trends_table(trends),
        "<h2>Regression alerts</h2>",
        _alerts_table(alerts),
        "<h2>Leaderboard</h2>",
        _leaderboard_section(leaderboard),
        "<h2>Evaluation time per save</h2>",
        _table(
            ["run", "iteration", "tokens", "ok", "not ok", "evaluation s", "blocked s"],
            _timing_rows(rows),
            numeric=["iteration", "tokens", "ok", "not ok", "evaluation s", "blocked s"],
            id="timing",
        ),
        "<h2>Failed and skipped evaluations</h2>",
        _problems_table(problems),
        "<h2>Baselines</h2>",
        _baselines_table(baselines),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Evaluation report: {escape(ledger_name)}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(body)}<script>{_SCRIPT}</script></body></html>\n"
    )


def _trends_table(trends: Sequence[Trend]) -> str:
    if not trends:
        return '<p class="note">No successful evaluation recorded yet.</p>'
    rows = [
        [t.run, t.benchmark, t.metric, t.checkpoints, _maybe(t.latest), _maybe(t.stderr),
         _maybe(t.detectable_change), _maybe(t.kendall_tau, ".2f"),
         "" if t.slope is None else f"{t.slope:+.3g} [{t.slope_low:+.3g}, {t.slope_high:+.3g}] per {t.slope_per}",
         t.verdict, t.instances_for_target or ""]
        for t in trends
    ]  # fmt: skip
    columns = ["run", "benchmark", "metric", "saves", "latest", "± se", "detectable change", "Kendall tau",
               "slope [95%]", "verdict", "instances for ±0.02"]  # fmt: skip
    note = (
        '<p class="note">detectable change: the smallest change a paired test of two saves detects at this '
        "instance count (80% power, 5% level); a verdict says whether the trend's 95% interval excludes zero.</p>"
    )
    return _table(columns, rows, numeric=["saves", "latest", "± se", "detectable change", "Kendall tau",
                                          "instances for ±0.02"], id="trends") + note  # fmt: skip


def _alerts_table(alerts: Sequence[Mapping[str, Any]]) -> str:
    if not alerts:
        return '<p class="note">No regression beyond noise recorded.</p>'
    rows = [
        [a["run"], a["iteration"], a["benchmark"], a["metric"], a["against"], f"{a['difference']:+.4f}",
         f"[{a['ci_low']:+.4f}, {a['ci_high']:+.4f}]", f"{a['p_holm']:.2g}"]
        for a in alerts
    ]  # fmt: skip
    columns = ["run", "iteration", "benchmark", "metric", "against iteration", "difference", "95% interval", "p_holm"]
    return _table(columns, rows, numeric=["iteration", "against iteration", "difference", "p_holm"], id="alerts")


def _maybe(value: float | None, spec: str = ".4f") -> str:
    return "" if value is None else format(value, spec)


def _problems_table(problems: Sequence[Sequence[Any]]) -> str:
    if not problems:
        return '<p class="note">None.</p>'
    head = "".join(f"<th>{c}</th>" for c in ("run", "iteration", "benchmark", "status", "started at", "reason"))
    body = "".join(
        f'<tr{_attrs(class_=status)}><td>{escape(run)}</td><td class="num">{iteration}</td><td>{escape(benchmark)}</td>'
        f"<td>{escape(status)}</td><td>{escape(started)}</td>"
        f'<td><pre class="reason">{escape(reason)}</pre></td></tr>'
        for run, iteration, benchmark, status, started, reason in problems
    )
    return f'<table id="problems"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _baselines_table(baselines: Sequence[BaselineScore]) -> str:
    if not baselines:
        return '<p class="note">None recorded (megatron-eval baselines --config conf/baselines.yaml --ledger ...).</p>'
    rows = [
        [b.model, b.benchmark, b.metric, _number(b.value), format_count(b.tokens), b.source or ""] for b in baselines
    ]
    return _table(
        ["model", "benchmark", "metric", "value", "tokens", "source"], rows, numeric=["value", "tokens"], id="baselines"
    )


def write_report(path: str | Path, html: str) -> Path:
    """Write `html` to `path` (its folder created when missing); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
