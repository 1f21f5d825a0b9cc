"""The HTML report, checked in a real headless browser (Debian's chromium, installed by `make test`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest
from ledger_views import BASELINES, BETA, INJECTED, filled_ledger

from megatron_eval_hook.cli import main
from megatron_eval_hook.ledger import Ledger

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not found: `make test` installs it (apt-get install chromium)"
)


def load_in_browser(page: Path, profile: Path) -> tuple[str, list[str]]:
    """Load `page` in headless chromium: (the DOM after its scripts ran, the console messages)."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", f"--user-data-dir={profile}",
         # no connections of chromium's own: the test machines reach no network
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
         "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return result.stdout, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


class Charts(HTMLParser):
    """Every plotted point and baseline line of the DOM, with the axis of the figure it is in."""

    def __init__(self) -> None:
        super().__init__()
        self.axis: str | None = None
        self.points: list[tuple[str, dict[str, str]]] = []
        self.baselines: list[tuple[str, str, dict[str, str]]] = []
        self.benchmark: str | None = None
        self.scripts = 0

    def handle_starttag(self, tag: str, attributes: list[tuple[str, str | None]]) -> None:
        attrs = {k: v or "" for k, v in attributes}
        if tag == "figure":
            self.axis, self.benchmark = attrs["data-axis"], attrs["data-benchmark"]
        elif tag == "circle" and attrs.get("class") == "point":
            self.points.append((self.axis, attrs))
        elif tag == "g" and attrs.get("class") == "baseline":
            self.baselines.append((self.axis, self.benchmark, attrs))
        elif tag == "script":
            self.scripts += 1


@pytest.fixture
def report(tmp_path) -> Path:
    ledger = filled_ledger(tmp_path / "ledger.sqlite")
    out = tmp_path / "out" / "report.html"
    assert main(["report", "--ledger", str(ledger), "--out", str(out)]) == 0
    return out


def ledger_points(path: Path, *, with_tokens: bool) -> Counter:
    rows = Ledger(path).results()
    return Counter(
        (r["run"], r["benchmark"], r["metric"], str(r["iteration"]), repr(r["value"]))
        for r in rows
        if r["status"] == "ok" and r["main"] and (r["tokens"] is not None or not with_tokens)
    )


def test_the_report_is_one_file_that_fetches_nothing_and_escapes_ledger_text(report):
    html = report.read_text()
    assert "<link" not in html and "src=" not in html and "@import" not in html and "url(" not in html
    assert html.count("<script>") == 1  # the report's own; the failure reason's stays text
    assert "&lt;script&gt;console.error(&#x27;injected&#x27;)&lt;/script&gt;" in html
    assert "beta &amp; &lt;i&gt;co&lt;/i&gt;" in html and "<i>co</i>" not in html


@needs_chromium
def test_the_browser_check_sees_console_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>console.error('seen'); missing();</script></body></html>")
    _, console = load_in_browser(page, tmp_path / "profile")
    assert any("seen" in line for line in console) and any("Uncaught" in line for line in console)


@needs_chromium
def test_the_report_renders_in_a_browser_with_one_point_per_ledger_row_and_no_console_error(report, tmp_path):
    dom, console = load_in_browser(report, tmp_path / "profile")
    assert console == []
    charts = Charts()
    charts.feed(dom)
    assert charts.scripts == 1  # the failure reason holding a <script> rendered as text

    def plotted(axis: str) -> Counter:
        return Counter(
            (a["data-run"], a["data-benchmark"], a["data-metric"], a["data-iteration"], a["data-value"])
            for axis_of, a in charts.points
            if axis_of == axis
        )

    ledger = report.parent.parent / "ledger.sqlite"
    assert plotted("iteration") == ledger_points(ledger, with_tokens=False)
    assert plotted("tokens") == ledger_points(ledger, with_tokens=True)  # BETA has no token counts
    assert BETA in {a["data-run"] for _, a in charts.points}
    by_tokens = {
        (a["data-run"], a["data-iteration"], a["data-tokens"]) for axis, a in charts.points if axis == "tokens"
    }
    assert ("alpha", "300", str(300 * 4096)) in by_tokens

    expected = {(b.benchmark, b.model, repr(b.value)) for b in BASELINES if b.benchmark in ("mmlu", "boolq")}
    for axis in ("iteration", "tokens"):
        drawn = {(bench, a["data-baseline"], a["data-value"]) for ax, bench, a in charts.baselines if ax == axis}
        assert drawn == expected  # HellaSwag has no run scores, so no chart


# Run in the report's page: for each plotted point with an interval, whether its run's band covers the interval's
# two ends (just inside them) and stops there (just outside them), the chart's own scale mapping values to pixels.
_BAND_CHECK = """
<script>
var found = [];
document.querySelectorAll("svg").forEach(function (svg) {
  var low = parseFloat(svg.dataset.yLow), high = parseFloat(svg.dataset.yHigh);
  var top = parseFloat(svg.dataset.top), height = parseFloat(svg.dataset.height);
  function y(value) { return top + (high - value) / (high - low) * height; }
  svg.querySelectorAll("circle.point").forEach(function (point) {
    if (point.dataset.ciLow === undefined) { return; }
    var band = point.parentNode.querySelector("polygon.band");
    var x = parseFloat(point.getAttribute("cx"));
    var upper = y(parseFloat(point.dataset.ciHigh)), lower = y(parseFloat(point.dataset.ciLow));
    function inside(py) { var p = svg.createSVGPoint(); p.x = x; p.y = py; return band.isPointInFill(p); }
    found.push([point.dataset.run, point.dataset.iteration, inside(upper + 0.3), inside(lower - 0.3),
                inside(upper - 2), inside(lower + 2)]);
  });
});
var out = document.createElement("pre"); out.id = "bands"; out.textContent = JSON.stringify(found);
document.body.appendChild(out);
</script>
"""


@needs_chromium
def test_each_score_is_drawn_in_a_band_that_holds_its_95_percent_interval(report, tmp_path):
    page = tmp_path / "checked.html"
    page.write_text(report.read_text().replace("</body>", _BAND_CHECK + "</body>"))
    dom, console = load_in_browser(page, tmp_path / "profile")
    assert console == []
    found = json.loads(unescape(dom.split('<pre id="bands">')[1].split("</pre>")[0]))
    ledger = report.parent.parent / "ledger.sqlite"
    with_interval = [r for r in Ledger(ledger).results() if r["status"] == "ok" and r["ci_low"] is not None]
    assert len(found) == len(with_interval) + sum(r["tokens"] is not None for r in with_interval)  # both charts
    assert all(at_upper and at_lower and not beyond_upper and not beyond_lower
               for _, _, at_upper, at_lower, beyond_upper, beyond_lower in found), found  # fmt: skip


def test_the_report_shows_each_benchmarks_signal_and_noise_and_the_regression_alerts(tmp_path):
    from megatron_eval_hook.compare import Comparison

    ledger = filled_ledger(tmp_path / "ledger.sqlite")
    drop = Comparison("mmlu", "exact_match", 20, 0.35, 0.40, -0.05, -0.09, -0.01, "mcnemar", 0.004, 0.008)
    Ledger(ledger).record_alert("alpha", 300, 200, drop)
    out = tmp_path / "report.html"
    assert main(["report", "--ledger", str(ledger), "--out", str(out)]) == 0
    html = out.read_text()
    trends = html.split('id="trends"')[1].split("</table>")[0]
    assert trends.count("<tr>") == 1 + 5  # header, and alpha's 3 benchmarks and beta's 2
    assert "rising beyond noise" in trends or "flat within noise" in trends
    assert "not enough checkpoints" in trends  # beta: one save
    alerts = html.split('id="alerts"')[1].split("</table>")[0]
    assert "mmlu" in alerts and "-0.0500" in alerts and "0.008" in alerts


@needs_chromium
def test_the_report_lists_failed_and_skipped_evaluations_with_their_reasons_as_text(report, tmp_path):
    dom, _ = load_in_browser(report, tmp_path / "profile")
    problems = dom[dom.index('<table id="problems">') :]
    problems = problems[: problems.index("</table>")]
    assert "failed" in problems and "skipped" in problems
    assert f"RuntimeError: {INJECTED}".replace("<", "&lt;").replace(">", "&gt;") in problems
    assert "exit signal: &lt;b&gt;SIGTERM&lt;/b&gt;" in problems


def test_the_report_shows_evaluation_and_blocked_time_per_save(report):
    html = report.read_text()
    timing = html[html.index('<table id="timing">') :]
    timing = timing[: timing.index("</table>")]
    # alpha at 300: two ok benchmarks (2.0 s each) and one failure (0.5 s); training blocked 7 s
    assert '<td>alpha</td><td class="num">300</td><td class="num">1.2M</td><td class="num">2</td>' in timing
    assert '<td class="num">4.5</td><td class="num">7.0</td>' in timing


def test_cli_report_with_a_missing_ledger_names_it_and_the_fix(tmp_path, capsys):
    assert main(["report", "--ledger", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "r.html")]) == 2
    error = capsys.readouterr().err
    assert "none.sqlite" in error and "Fix:" in error
    assert not (tmp_path / "r.html").exists()
