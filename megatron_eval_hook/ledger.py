"""The ledger: a SQLite record of every evaluation attempt, written before any sink.

One `evaluations` row per (save, benchmark) attempt, with its status (`ok`, `failed` with the
reason, `skipped` with the reason), and one `metrics` row per metric of an `ok` attempt.
`baselines` holds published scores of other models, to compare runs against. W&B and
every other view are rebuilt from this file; nothing reads results from anywhere else.

An attempt is inserted as `running` before the evaluation starts and closed when it ends, so a
process that dies mid-evaluation leaves a trace; the next `Ledger.close_interrupted` turns it into
`failed` with the reason.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STATUSES = ("ok", "failed", "skipped")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    id          INTEGER PRIMARY KEY,
    run         TEXT    NOT NULL,
    iteration   INTEGER NOT NULL,
    benchmark   TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('running', 'ok', 'failed', 'skipped')),
    error       TEXT,
    started_at  TEXT    NOT NULL,   -- ISO 8601, UTC
    duration_s  REAL,               -- wall time of this benchmark's evaluation
    blocked_s   REAL,               -- time training waited for the whole save's evaluation
    placement   TEXT,
    tokens      INTEGER,            -- training tokens consumed at this iteration, when known
    main_metric TEXT,
    main_split  TEXT
);
CREATE INDEX IF NOT EXISTS evaluations_by_run ON evaluations (run, iteration, benchmark);
CREATE TABLE IF NOT EXISTS metrics (
    evaluation_id INTEGER NOT NULL REFERENCES evaluations (id),
    metric        TEXT    NOT NULL,
    split         TEXT    NOT NULL,
    value         REAL,
    count         INTEGER,
    PRIMARY KEY (evaluation_id, metric, split)
);
CREATE TABLE IF NOT EXISTS instances (
    evaluation_id INTEGER NOT NULL REFERENCES evaluations (id),
    run_index     INTEGER NOT NULL,   -- which of the HELM runs averaged into the benchmark (e.g. an MMLU subject)
    instance      TEXT    NOT NULL,   -- HELM's instance id
    value         REAL    NOT NULL,   -- the main metric on this instance
    gold_logprob  REAL,               -- multiple choice, answers scored separately: the gold answer's log-prob
    wrong_logprob REAL,               -- ... and the best wrong answer's
    PRIMARY KEY (evaluation_id, run_index, instance)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts (
    run         TEXT    NOT NULL,
    iteration   INTEGER NOT NULL,   -- the evaluation whose score dropped
    benchmark   TEXT    NOT NULL,
    against     INTEGER NOT NULL,   -- the earlier iteration it was compared with
    metric      TEXT    NOT NULL,
    difference  REAL    NOT NULL,   -- its score minus the earlier one's, on the same instances
    ci_low      REAL    NOT NULL,   -- 95% paired interval of the difference
    ci_high     REAL    NOT NULL,
    p_value     REAL    NOT NULL,   -- paired test (compare.py)
    p_holm      REAL    NOT NULL,   -- adjusted over the benchmarks of that evaluation
    recorded_at TEXT    NOT NULL,   -- ISO 8601, UTC
    PRIMARY KEY (run, iteration, benchmark)
);
CREATE TABLE IF NOT EXISTS deliveries (
    evaluation_id INTEGER NOT NULL REFERENCES evaluations (id),
    sink          TEXT    NOT NULL,   -- wandb, tensorboard: a sink that has received this evaluation's scores
    PRIMARY KEY (evaluation_id, sink)
);
CREATE TABLE IF NOT EXISTS runs (
    run         TEXT    PRIMARY KEY,
    save_dir    TEXT    NOT NULL,   -- the training run's --save folder, relative to the ledger's folder
    claimed_at  TEXT    NOT NULL    -- ISO 8601, UTC
);
CREATE TABLE IF NOT EXISTS baselines (
    model       TEXT    NOT NULL,   -- a published model, e.g. pythia-160m
    benchmark   TEXT    NOT NULL,
    metric      TEXT    NOT NULL,
    value       REAL    NOT NULL,
    tokens      INTEGER,            -- the model's training tokens, when published
    source      TEXT,               -- where the number was published
    recorded_at TEXT    NOT NULL,   -- ISO 8601, UTC
    PRIMARY KEY (model, benchmark, metric)
);
"""


@dataclass(frozen=True)
class BaselineScore:
    """A published score of another model: `value` of `metric` on `benchmark`."""

    model: str
    benchmark: str
    metric: str
    value: float
    tokens: int | None = None
    source: str | None = None


@dataclass(frozen=True)
class MetricValue:
    """One aggregated metric of a benchmark: HELM's mean over `count` instances of `split`."""

    metric: str
    split: str
    value: float
    count: int


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class LedgerUnusable(Exception):
    """The ledger's path cannot hold a ledger; the message names the path, why, and the fix."""


def _why_unusable(path: Path, error: BaseException) -> tuple[str, str]:
    """(what is wrong with `path`, the fix) for an error met while opening a ledger there."""
    text = str(error).lower()
    if path.is_dir():
        return "it is a directory", f"name a file, e.g. {path / 'ledger.sqlite'}"
    if "not a database" in text or "malformed" in text:
        return "it is not a SQLite file", "name another file, or move this one away"
    if "disk is full" in text or getattr(error, "errno", None) == 28:
        return "its file system is full", "free space there, or put the ledger on another file system"
    if "readonly" in text or "unable to open" in text or isinstance(error, PermissionError):
        return "it cannot be written", "make its folder writable, or name a ledger path that is"
    return f"{type(error).__name__}: {error}", "name a writable file on a local file system"


class Ledger:
    """The SQLite ledger at `path` (created with its folder when missing); `LedgerUnusable` when it cannot be."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                tracked = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'deliveries'").fetchone()
                db.executescript(_SCHEMA)
                columns = {row[1] for row in db.execute("PRAGMA table_info(instances)")}
                for column in ("gold_logprob", "wrong_logprob"):  # instances tables from before they were kept
                    if column not in columns:
                        db.execute(f"ALTER TABLE instances ADD COLUMN {column} REAL")
                if tracked is None:  # a ledger from before deliveries were recorded: its sinks had every score
                    db.execute(
                        "INSERT OR IGNORE INTO deliveries SELECT id, sink FROM evaluations,"
                        " (SELECT 'wandb' AS sink UNION SELECT 'tensorboard') WHERE status = 'ok'"
                    )
        except (sqlite3.Error, OSError) as error:
            reason, fix = _why_unusable(self.path, error)
            raise LedgerUnusable(f"{self.path} cannot hold the ledger: {reason}. Fix: {fix}.") from error

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short transaction per write: a crash never loses what was already recorded.
        db = sqlite3.connect(self.path, timeout=60.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            with db:
                yield db
        finally:
            db.close()

    def begin(
        self,
        run: str,
        iteration: int,
        benchmark: str,
        *,
        placement: str,
        tokens: int | None = None,
        main_metric: str | None = None,
        main_split: str | None = None,
    ) -> int:
        """Record that `benchmark` is being evaluated at `iteration`; return the attempt's id."""
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO evaluations (run, iteration, benchmark, status, started_at, placement, tokens,"
                " main_metric, main_split) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (run, iteration, benchmark, utc_now(), placement, tokens, main_metric, main_split),
            )
            return int(cursor.lastrowid)

    def finish_ok(
        self,
        evaluation_id: int,
        metrics: Iterable[MetricValue],
        duration_s: float,
        instances: Sequence[Sequence[tuple]] = (),
    ) -> None:
        """Record the evaluation as `ok` with its `metrics` and, per HELM run of the benchmark, its instances
        (instance id, the main metric's value[, the gold answer's log-prob, the best wrong answer's]), in one
        transaction."""
        rows = [
            (evaluation_id, index, instance, value, *(list(logprobs) + [None, None])[:2])
            for index, run in enumerate(instances)
            for instance, value, *logprobs in run
        ]
        with self._connect() as db:
            db.executemany(
                "INSERT OR REPLACE INTO instances (evaluation_id, run_index, instance, value, gold_logprob,"
                " wrong_logprob) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.executemany(
                "INSERT OR REPLACE INTO metrics (evaluation_id, metric, split, value, count) VALUES (?, ?, ?, ?, ?)",
                [(evaluation_id, m.metric, m.split, m.value, m.count) for m in metrics],
            )
            db.execute(
                "UPDATE evaluations SET status = 'ok', error = NULL, duration_s = ? WHERE id = ?",
                (duration_s, evaluation_id),
            )

    def finish_failed(self, evaluation_id: int, error: str, duration_s: float) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE evaluations SET status = 'failed', error = ?, duration_s = ? WHERE id = ?",
                (error, duration_s, evaluation_id),
            )

    def record_skipped(
        self, run: str, iteration: int, benchmark: str, reason: str, *, placement: str, tokens: int | None = None
    ) -> int:
        """Record that `benchmark` was not evaluated at `iteration`, and why."""
        return self._record("skipped", run, iteration, benchmark, reason, placement, tokens)

    def record_failed(
        self, run: str, iteration: int, benchmark: str, reason: str, *, placement: str, tokens: int | None = None
    ) -> int:
        """Record that evaluating `benchmark` at `iteration` failed before it began, and why."""
        return self._record("failed", run, iteration, benchmark, reason, placement, tokens)

    def _record(
        self, status: str, run: str, iteration: int, benchmark: str, reason: str, placement: str, tokens: int | None
    ) -> int:
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO evaluations (run, iteration, benchmark, status, error, started_at, duration_s,"
                " blocked_s, placement, tokens) VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, ?)",
                (run, iteration, benchmark, status, reason, utc_now(), placement, tokens),
            )
            return int(cursor.lastrowid)

    def fail_running(self, run: str, iteration: int, reason: str) -> int:
        """Mark the attempts at `iteration` still `running` (their process was stopped) as failed; return how many."""
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE evaluations SET status = 'failed', error = ?"
                " WHERE run = ? AND iteration = ? AND status = 'running'",
                (reason, run, iteration),
            )
            return cursor.rowcount

    def set_blocked(self, evaluation_ids: Iterable[int], blocked_s: float) -> None:
        with self._connect() as db:
            db.executemany(
                "UPDATE evaluations SET blocked_s = ? WHERE id = ?", [(blocked_s, i) for i in evaluation_ids]
            )

    def last_evaluation_id(self) -> int:
        """The id of the latest attempt recorded (0 in an empty ledger): later ones have larger ids."""
        with self._connect() as db:
            return db.execute("SELECT COALESCE(MAX(id), 0) FROM evaluations").fetchone()[0]

    def mark_delivered(self, run: str, iteration: int, benchmarks: Iterable[str], sink: str) -> None:
        """`sink` has received the scores of `benchmarks` at `iteration` of `run` (their `ok` evaluations)."""
        names = list(benchmarks)
        if not names:
            return
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO deliveries SELECT id, ? FROM evaluations WHERE run = ? AND iteration = ?"
                f" AND status = 'ok' AND benchmark IN ({','.join('?' * len(names))})",
                (sink, run, iteration, *names),
            )

    def undelivered(self, run: str, sink: str, up_to: int) -> list[dict[str, Any]]:
        """The metrics of `run`'s `ok` evaluations with ids up to `up_to` that `sink` never received, by
        iteration then id: one dict per metric (iteration, benchmark, metric, split, value, main_metric,
        main_split)."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                """
                SELECT e.iteration, e.benchmark, e.main_metric, e.main_split, m.metric, m.split, m.value
                FROM evaluations e JOIN metrics m ON m.evaluation_id = e.id
                WHERE e.run = ? AND e.status = 'ok' AND e.id <= ?
                    AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.evaluation_id = e.id AND d.sink = ?)
                ORDER BY e.iteration, e.id, m.split, m.metric
                """,
                (run, up_to, sink),
            ).fetchall()
        return [dict(r) for r in rows]

    def claim_run(self, run: str, save_dir: str | Path) -> str | None:
        """Record that `run` names the training run saving into `save_dir`; None when it does (now or already),
        else the folder of the other run that holds the name, whose results `run`'s would merge with.

        The folder is kept relative to the ledger's: a run folder holding its own ledger (the default,
        <save>/eval_hook/ledger.sqlite) keeps its name when it is moved or copied whole."""
        here = self.path.parent.resolve()
        folder = os.path.relpath(Path(save_dir).resolve(), here)
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO runs (run, save_dir, claimed_at) VALUES (?, ?, ?)", (run, folder, utc_now())
            )
            (holder,) = db.execute("SELECT save_dir FROM runs WHERE run = ?", (run,)).fetchone()
        return None if holder == folder else os.path.normpath(here / holder)

    def close_interrupted(self, run: str) -> int:
        """Mark `run`'s attempts left `running` by a process that died as failed; return how many."""
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE evaluations SET status = 'failed', error = ? WHERE run = ? AND status = 'running'",
                ("interrupted: the process ended before this evaluation finished", run),
            )
            return cursor.rowcount

    def failed_attempts(self, run: str, iteration: int) -> dict[str, int]:
        """For each benchmark of `run` at `iteration`, how many of its attempts failed."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT benchmark, COUNT(*) FROM evaluations WHERE run = ? AND iteration = ? AND status = 'failed'"
                " GROUP BY benchmark",
                (run, iteration),
            ).fetchall()
        return dict(rows)

    def lacking(self, run: str, iteration: int, benchmarks: list[str], max_attempts: int) -> list[str]:
        """Of `benchmarks`, those without an `ok` result of `run` at `iteration` that failed there fewer than
        `max_attempts` times (a save that fails for a permanent cause is not retried forever)."""
        with self._connect() as db:
            done = {name for (name,) in db.execute(
                "SELECT DISTINCT benchmark FROM evaluations WHERE run = ? AND iteration = ? AND status = 'ok'",
                (run, iteration),
            )}  # fmt: skip
        failed = self.failed_attempts(run, iteration)
        return [name for name in benchmarks if name not in done and failed.get(name, 0) < max_attempts]

    def ok_benchmarks(self, run: str) -> dict[int, set[str]]:
        """For each iteration of `run`, the benchmarks with an `ok` evaluation."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT DISTINCT iteration, benchmark FROM evaluations WHERE run = ? AND status = 'ok'", (run,)
            ).fetchall()
        done: dict[int, set[str]] = {}
        for iteration, benchmark in rows:
            done.setdefault(iteration, set()).add(benchmark)
        return done

    def instance_values(self, evaluation_ids: Iterable[int]) -> dict[int, list[list[float]]]:
        """For each of `evaluation_ids` with per-instance values, its main metric's values, one list per HELM run."""
        ids = list(evaluation_ids)
        found: dict[int, dict[int, list[float]]] = {}
        with self._connect() as db:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows = db.execute(
                    f"SELECT evaluation_id, run_index, value FROM instances WHERE evaluation_id IN "
                    f"({','.join('?' * len(chunk))}) ORDER BY evaluation_id, run_index, instance",
                    chunk,
                ).fetchall()
                for evaluation_id, index, value in rows:
                    found.setdefault(evaluation_id, {}).setdefault(index, []).append(value)
        return {evaluation_id: [runs[i] for i in sorted(runs)] for evaluation_id, runs in found.items()}

    def ok_evaluations(self, run: str, iteration: int | None = None) -> dict[str, tuple[int, str]]:
        """For each benchmark with an `ok` evaluation of `run` at `iteration` (None: the run's latest such
        iteration), the latest one's id and main metric."""
        with self._connect() as db:
            if iteration is None:
                found = db.execute(
                    "SELECT MAX(iteration) FROM evaluations WHERE run = ? AND status = 'ok'", (run,)
                ).fetchone()
                iteration = found[0] if found else None
            rows = db.execute(
                "SELECT benchmark, id, main_metric FROM evaluations WHERE run = ? AND iteration = ? AND status = 'ok'"
                " ORDER BY id",
                (run, iteration),
            ).fetchall()
        return {benchmark: (evaluation_id, metric) for benchmark, evaluation_id, metric in rows}

    def earlier_ok(self, run: str, benchmark: str, iteration: int) -> list[tuple[int, int, float]]:
        """(iteration, evaluation id, main score) of the latest `ok` evaluation of `benchmark` at each iteration of
        `run` before `iteration`, oldest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT e.iteration, e.id, m.value FROM evaluations e JOIN metrics m ON m.evaluation_id = e.id"
                " AND m.metric = e.main_metric AND m.split = e.main_split"
                " WHERE e.run = ? AND e.benchmark = ? AND e.status = 'ok' AND e.iteration < ? ORDER BY e.id",
                (run, benchmark, iteration),
            ).fetchall()
        latest = {earlier: (earlier, evaluation_id, value) for earlier, evaluation_id, value in rows}
        return [latest[i] for i in sorted(latest)]

    def record_alert(self, run: str, iteration: int, against: int, comparison: Any) -> None:
        """Record that `comparison` (a `compare.Comparison` of `iteration` against `against`) is a regression."""
        c = comparison
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO alerts (run, iteration, benchmark, against, metric, difference, ci_low,"
                " ci_high, p_value, p_holm, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run, iteration, c.benchmark, against, c.metric, c.difference, c.ci_low, c.ci_high, c.p_value,
                 c.p_holm, utc_now()),
            )  # fmt: skip

    def alerts(self, run: str | None = None) -> list[dict[str, Any]]:
        """Every recorded regression (of `run`, or of every run), by run and iteration."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT * FROM alerts WHERE ? IS NULL OR run = ? ORDER BY run, iteration, benchmark", (run, run)
            ).fetchall()
        return [dict(row) for row in rows]

    def instances_by_key(self, evaluation_id: int) -> dict[tuple[int, str], float]:
        """The per-instance values of evaluation `evaluation_id`, by (HELM run index, instance id)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT run_index, instance, value FROM instances WHERE evaluation_id = ?", (evaluation_id,)
            ).fetchall()
        return {(index, instance): value for index, instance, value in rows}

    def results(self, run: str | None = None, all_metrics: bool = False, running: bool = False) -> list[dict[str, Any]]:
        """Every finished attempt (and, if `running`, every attempt still running), oldest first, as flat rows.

        An `ok` attempt gives one row per metric (only its main metric unless `all_metrics`);
        a `failed`, `skipped` or `running` attempt gives one row with `metric` and `value` null.
        The main metric's row has its standard error and 95% interval (`stderr`, `ci_low`, `ci_high`, from the
        per-instance values: `uncertainty.py`); null on the other rows, and where no instances were recorded.
        """
        from megatron_eval_hook.uncertainty import of_runs

        query = """
            SELECT e.id, e.run, e.iteration, e.benchmark, e.status, e.error, e.started_at, e.duration_s,
                   e.blocked_s, e.placement, e.tokens, e.main_metric, e.main_split, m.metric, m.split, m.value,
                   m.count
            FROM evaluations e
            LEFT JOIN metrics m ON m.evaluation_id = e.id
                AND (? OR (m.metric = e.main_metric AND m.split = e.main_split))
            WHERE (? OR e.status != 'running') AND (? IS NULL OR e.run = ?)
            ORDER BY e.id, m.split, m.metric
        """
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(query, (int(all_metrics), int(running), run, run)).fetchall()
        values = self.instance_values(r["id"] for r in rows if r["status"] == "ok")
        intervals = {evaluation_id: of_runs(runs) for evaluation_id, runs in values.items()}

        def interval(r: sqlite3.Row) -> dict[str, float | None]:
            main = r["metric"] is not None and (r["metric"], r["split"]) == (r["main_metric"], r["main_split"])
            found = intervals.get(r["id"]) if main else None
            if found is None:
                return {"stderr": None, "ci_low": None, "ci_high": None}
            return {"stderr": found.stderr, "ci_low": found.low, "ci_high": found.high}

        return [
            {
                "run": r["run"],
                "iteration": r["iteration"],
                "benchmark": r["benchmark"],
                "metric": r["metric"],
                "split": r["split"],
                "value": r["value"],
                "count": r["count"],
                "main": r["metric"] is not None and r["metric"] == r["main_metric"] and r["split"] == r["main_split"],
                "status": r["status"],
                "error": r["error"],
                "started_at": r["started_at"],
                "duration_s": r["duration_s"],
                "blocked_s": r["blocked_s"],
                "placement": r["placement"],
                "tokens": r["tokens"],
                **interval(r),
            }
            for r in rows
            if r["status"] != "ok" or r["metric"] is not None
        ]

    def record_baselines(self, scores: Iterable[BaselineScore]) -> int:
        """Replace the baselines of every model in `scores` by `scores`, in one transaction; return how many.

        Recording the same scores again changes nothing; a model's scores left out are removed.
        """
        scores = list(scores)
        now = utc_now()
        with self._connect() as db:
            db.executemany("DELETE FROM baselines WHERE model = ?", [(m,) for m in {s.model for s in scores}])
            db.executemany(
                "INSERT INTO baselines (model, benchmark, metric, value, tokens, source, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(s.model, s.benchmark, s.metric, s.value, s.tokens, s.source, now) for s in scores],
            )
        return len(scores)

    def baselines(self) -> list[BaselineScore]:
        """Every recorded baseline score, by model, benchmark and metric."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT model, benchmark, metric, value, tokens, source FROM baselines"
                " ORDER BY model, benchmark, metric"
            ).fetchall()
        return [BaselineScore(*row) for row in rows]
