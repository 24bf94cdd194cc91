"""The run registry: every run, its stages, metrics and artifacts, in one SQL database.

This module is the one place that knows the registry schema. The engine
records through ``Registry`` methods; ``show``/``compare``/``runs`` read
``RunRecord`` objects back. Any SQLAlchemy URL works; SQLite and PostgreSQL
(``postgresql+psycopg://...``, a server a team shares) are tested. The default
is a SQLite file, ``registry.db`` in the working directory, or
``$SPARSIFY_REGISTRY``. Nothing here is SQLite-only: upserts are ``INSERT ...
ON CONFLICT`` (both databases), times are ISO strings or the database's own
clock, and lock conflicts (SQLite busy, PostgreSQL deadlock or serialization
failure) retry the whole transaction.

SQLite is set up for several processes writing at once: WAL journal (readers
never block the writer), a long busy timeout, and write transactions that
start with ``BEGIN IMMEDIATE`` so they queue for the write lock at their start
instead of failing when a reader upgrades to a writer mid-transaction.

Sweeps (a recipe's grid of runs) have a table of their own; their runs
point back to them (``runs.sweep_id``, ``runs.sweep_point``). Each point of a
sweep is a row of ``sweep_points`` (v8) that processes claim atomically
(``claim_sweep_point``: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, a
compare-and-set ``UPDATE`` everywhere) and keep alive with heartbeats on the
database's clock, so several workers on several machines share one sweep.
Benchmark records (``sparsify bench --record``) are runs of kind ``bench`` (a
stage per case, the ratios as metrics) whose machine (CPU model, ISA flags,
threads, torch, load) is a row of ``bench_machines``.

Evaluations are recorded explicitly (v7): each is a row of ``evaluations``
(the ``reference`` evaluation of the dense model, stage index -1, or the
evaluation after a ``stage``: split, size, status, times), and the metric rows
it wrote have ``origin`` ``evaluation``; numbers a stage reports itself
(``stage_seconds``, a method's ``sparsity``...) have ``origin`` ``stage``, and
training curves ``curve``. What each metric name of a run is (direction,
unit, fraction) is a row of ``metric_info``. ``evaluation_points``,
``final_evaluation`` and ``metric_info_for`` read these back, and are the
only functions that know how runs recorded before v7 (``RunRecord.schema``
None) are read: see ``evaluation_points``.

The schema carries a version; opening a registry applies the missing
migrations in order, under the write lock, so concurrent openers of a fresh
database migrate it once.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import platform
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import psutil
from sqlalchemy import (
    Column, Connection, Double, Engine, ForeignKey, Index, Integer, MetaData, String, Table, Text,
    UniqueConstraint, create_engine, event, inspect, insert, select, text, update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.schema import CreateColumn

from .dense_isa import threads_text
from .errors import SparsifyError
from .metric import MetricInfo

RUN_STATUSES = ("running", "finished", "failed", "interrupted")
SWEEP_POINT_STATUSES = ("pending", "running", "finished", "failed")
STAGE_STATUSES = ("pending", "running", "completed", "failed", "interrupted")
EVALUATION_STATUSES = ("running", "completed", "failed", "interrupted")
EVALUATION_KINDS = ("reference", "stage")  # the dense model's baseline, or the model after a stage
METRIC_ORIGINS = ("evaluation", "stage", "curve")
TERMINAL_STATUSES = frozenset({"finished", "failed", "interrupted"})
DEAD_PROCESS_REASON = "the process ended without reporting (killed?)"
DENSE_STAGE, DENSE_INDEX = "dense", -1

BUSY_TIMEOUT_S = 60
STALE_AFTER_S = 300.0  # default: a sweep point whose claimant sent no heartbeat for this long is reclaimed
_LOCK_RETRIES = 6  # on top of the busy timeout, for lock errors SQLite reports without waiting

T = TypeVar("T")


def default_url() -> str:
    """``$SPARSIFY_REGISTRY`` if set, else ``sqlite:///registry.db`` (in the working directory)."""
    return os.environ.get("SPARSIFY_REGISTRY") or "sqlite:///registry.db"


def as_url(location: str) -> str:
    """A SQLAlchemy URL as is; a plain file path (``runs/registry.db``) as the SQLite database at that path."""
    return location if "://" in location else f"sqlite:///{location}"


# -- the schema, as it is at the latest version (used to build queries) -------------------------

metadata = MetaData()

schema_info = Table(
    "schema_info", metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)

runs = Table(
    "runs", metadata,
    Column("id", String(64), primary_key=True),
    Column("recipe_name", Text, nullable=False),
    Column("recipe_hash", String(64)),
    Column("recipe_text", Text),
    Column("recipe_json", Text),
    Column("overrides", Text),  # JSON list of "key=value" strings
    Column("model", Text),
    Column("data", Text),
    Column("seed", Integer),
    Column("status", String(16), nullable=False),
    Column("reason", Text),
    Column("started_at", String(40), nullable=False),  # UTC ISO 8601
    Column("ended_at", String(40)),
    Column("versions", Text),  # JSON: python, torch, transformers, sparsify, platform
    Column("git_commit", String(64)),
    Column("host", Text),
    Column("pid", Integer),
    Column("output_dir", Text),
    Column("workdir", Text),
    # v2
    Column("attempts", Integer, nullable=False, server_default=text("1")),
    Column("sweep_id", String(64)),
    Column("pid_started_at", Double),  # the process's start time: tells a live pid from a reused one
    Column("recipe_path", Text),  # where the recipe file was (resolved), for resume and show
    # v3
    Column("kind", String(16), nullable=False, server_default=text("'recipe'")),  # recipe or bench
    # v4
    Column("sweep_point", Text),  # JSON of the grid values this run sets in its sweep
    # v7
    Column("schema", Integer),  # the schema version the run was recorded with; NULL: before v7
)

sweeps = Table(
    "sweeps", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", Text, nullable=False),
    Column("recipe_text", Text),
    Column("recipe_path", Text),
    Column("overrides", Text),  # JSON list of "key=value" strings
    Column("grid", Text),  # JSON: dotted path -> values
    Column("points", Integer, nullable=False),
    Column("created_at", String(40), nullable=False),
)

stages = Table(
    "stages", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("name", Text, nullable=False),
    Column("kind", Text),
    Column("method", Text),
    Column("params", Text),  # JSON
    Column("status", String(16), nullable=False),
    Column("reason", Text),
    Column("started_at", String(40)),
    Column("ended_at", String(40)),
    Column("duration_s", Double),
    Column("peak_memory_mb", Double),
    UniqueConstraint("run_id", "idx", name="uq_stages_run_idx"),
)

metrics = Table(
    "metrics", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("stage", Text, nullable=False),
    Column("stage_idx", Integer, nullable=False),
    Column("name", Text, nullable=False),
    Column("value", Double),  # NULL stands for NaN (SQLite cannot store NaN)
    Column("layer", Text),
    Column("created_at", String(40), nullable=False),
    # v2
    Column("step", Integer),
    # v5
    Column("error", Text),  # set when the metric failed: its one-line reason (value NULL)
    # v7
    Column("origin", String(16)),  # evaluation, stage or curve (METRIC_ORIGINS); NULL: recorded before v7
)

# v7: each evaluation of a run: the dense reference (stage_idx -1) or the model after a stage
evaluations = Table(
    "evaluations", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("stage_idx", Integer, nullable=False),
    Column("stage", Text, nullable=False),
    Column("kind", String(16), nullable=False),  # reference or stage
    Column("split", Text),  # the data split evaluated on
    Column("sequences", Integer),
    Column("tokens", Integer),  # sequences x sequence length
    Column("status", String(16), nullable=False),  # EVALUATION_STATUSES
    Column("reason", Text),
    Column("started_at", String(40), nullable=False),
    Column("ended_at", String(40)),
    UniqueConstraint("run_id", "stage_idx", name="uq_evaluations_run_idx"),
)

# v7: what a run's metric names are (a ``MetricInfo``), one row per run and name
metric_info = Table(
    "metric_info", metadata,
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("name", Text, primary_key=True),
    Column("higher_is_better", Integer),  # 1, 0, or NULL for neither
    Column("unit", Text, nullable=False, server_default=text("''")),
    Column("fraction", Integer, nullable=False, server_default=text("0")),
)

artifacts = Table(
    "artifacts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("stage_idx", Integer),
    Column("kind", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("created_at", String(40), nullable=False),
)

# v6: the machine a bench record was measured on, one row per ``bench`` run
bench_machines = Table(
    "bench_machines", metadata,
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("cpu_model", Text),
    Column("isa", Text),  # the kernels' ISA path (avx512, avx2, portable), else the CPU's widest: neon, generic
    Column("isa_flags", Text),  # JSON list of the CPU's vector-ISA flags (avx2, avx512f, ...)
    Column("threads", Integer),  # torch threads the cases ran with
    Column("cpus", Integer),
    Column("torch_version", Text),
    Column("load_before", Double),  # 1-minute load average before and after the cases
    Column("load_after", Double),
    Column("quick", Integer, nullable=False, server_default=text("0")),  # 1: smoke sizes, not a measurement
)

# v8: each point of a sweep and who works on it; a claimant keeps ``heartbeat_at`` fresh while it runs it
sweep_points = Table(
    "sweep_points", metadata,
    Column("sweep_id", String(64), ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),  # the point's index in the expanded grid
    Column("point", Text, nullable=False),  # canonical JSON of its grid values (``runs.sweep_point``)
    Column("status", String(16), nullable=False),  # SWEEP_POINT_STATUSES
    Column("run_id", String(64)),  # the run that finished or failed it last
    Column("attempts", Integer, nullable=False, server_default=text("0")),  # claims so far
    Column("token", String(32)),  # the current claim's random id: only its holder may beat or settle it
    Column("worker_host", Text),
    Column("worker_pid", Integer),
    Column("worker_started", Double),  # the claimant's process start time (tells a reused pid)
    Column("claimed_at", Double),  # database clock, seconds since the epoch
    Column("heartbeat_at", Double),  # database clock, seconds since the epoch
    Column("stale_after", Double),  # seconds without a heartbeat after which the claim is dead
    Column("reason", Text),  # why it failed, or whom it was reclaimed from
)


# -- migrations: frozen history, never edited once released -----------------------------------
# Each one takes the schema from version i-1 to i. They spell their tables out
# instead of reusing the definitions above, which follow the latest version.

def _migration_1(conn: Connection) -> None:
    """The base tables: runs, stages, metrics, artifacts."""
    m = MetaData()
    Table("schema_info", m, Column("id", Integer, primary_key=True), Column("version", Integer, nullable=False))
    Table("runs", m,
          Column("id", String(64), primary_key=True), Column("recipe_name", String(200), nullable=False),
          Column("recipe_hash", String(64)), Column("recipe_text", Text), Column("recipe_json", Text),
          Column("overrides", Text), Column("model", String(500)), Column("data", String(500)),
          Column("seed", Integer), Column("status", String(16), nullable=False), Column("reason", Text),
          Column("started_at", String(40), nullable=False), Column("ended_at", String(40)),
          Column("versions", Text), Column("git_commit", String(64)), Column("host", String(255)),
          Column("pid", Integer), Column("output_dir", Text), Column("workdir", Text),
          Index("ix_runs_started_at", "started_at"), Index("ix_runs_recipe_name", "recipe_name"),
          Index("ix_runs_status", "status"))
    Table("stages", m,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
          Column("idx", Integer, nullable=False), Column("name", String(200), nullable=False),
          Column("kind", String(100)), Column("method", String(100)), Column("params", Text),
          Column("status", String(16), nullable=False), Column("reason", Text),
          Column("started_at", String(40)), Column("ended_at", String(40)),
          Column("duration_s", Double), Column("peak_memory_mb", Double),
          UniqueConstraint("run_id", "idx", name="uq_stages_run_idx"))
    Table("metrics", m,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
          Column("stage", String(200), nullable=False), Column("stage_idx", Integer, nullable=False),
          Column("name", String(200), nullable=False), Column("value", Double), Column("layer", String(500)),
          Column("created_at", String(40), nullable=False),
          Index("ix_metrics_run", "run_id", "stage_idx"))
    Table("artifacts", m,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
          Column("stage_idx", Integer), Column("kind", String(50), nullable=False),
          Column("path", Text, nullable=False), Column("created_at", String(40), nullable=False),
          Index("ix_artifacts_run", "run_id"))
    m.create_all(conn)


def _migration_2(conn: Connection) -> None:
    """Resumable runs (attempts, process start time, recipe path), sweeps, and training curves (metrics.step)."""
    _add_column(conn, "runs", Column("attempts", Integer, nullable=False, server_default=text("1")))
    _add_column(conn, "runs", Column("sweep_id", String(64)))
    _add_column(conn, "runs", Column("pid_started_at", Double))
    _add_column(conn, "runs", Column("recipe_path", Text))
    _add_column(conn, "metrics", Column("step", Integer))
    m = MetaData()
    Index("ix_runs_sweep", Table("runs", m, Column("sweep_id", String(64))).c.sweep_id).create(conn)


def _migration_3(conn: Connection) -> None:
    """What a run is: ``recipe`` (``sparsify run``) or ``bench`` (``sparsify bench --record``)."""
    _add_column(conn, "runs", Column("kind", String(16), nullable=False, server_default=text("'recipe'")))


def _migration_4(conn: Connection) -> None:
    """Sweeps: a table of sweeps (the recipe and its grid) and the grid point of each of their runs."""
    _add_column(conn, "runs", Column("sweep_point", Text))
    m = MetaData()
    Table("sweeps", m,
          Column("id", String(64), primary_key=True), Column("name", String(200), nullable=False),
          Column("recipe_text", Text), Column("recipe_path", Text), Column("overrides", Text), Column("grid", Text),
          Column("points", Integer, nullable=False), Column("created_at", String(40), nullable=False),
          Index("ix_sweeps_created_at", "created_at"))
    m.create_all(conn)


def _migration_5(conn: Connection) -> None:
    """Failed metrics: ``metrics.error`` holds the one-line reason a metric could not be measured."""
    _add_column(conn, "metrics", Column("error", Text))


def _migration_6(conn: Connection) -> None:
    """Bench records' machines: a ``bench_machines`` table, filled for the bench runs already recorded.

    Before, a bench run kept its machine in ``model`` (``"cpu avx2, 4 threads"``,
    `` (quick: ...)`` appended for smoke runs), ``data`` (``"load 1.0 -> 2.0"``)
    and every stage's ``params`` (``{"environment": {...}}``); those move here
    and are cleared.
    """
    m = MetaData()
    old_runs = Table("runs", m, Column("id", String(64), primary_key=True), Column("kind", String(16)),
                     Column("model", Text), Column("data", Text))
    old_stages = Table("stages", m, Column("run_id", String(64)), Column("idx", Integer), Column("params", Text))
    table = Table("bench_machines", m,
                  Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
                  Column("cpu_model", String(255)), Column("isa", String(32)), Column("isa_flags", Text),
                  Column("threads", Integer), Column("cpus", Integer), Column("torch_version", String(64)),
                  Column("load_before", Double), Column("load_after", Double),
                  Column("quick", Integer, nullable=False, server_default=text("0")))
    table.create(conn)
    for r in conn.execute(select(old_runs).where(old_runs.c.kind == "bench")).all():
        params = conn.execute(select(old_stages.c.params).where(old_stages.c.run_id == r.id)
                              .order_by(old_stages.c.idx).limit(1)).scalar()
        env = _loads(params, {}).get("environment") or {}
        after = None
        if r.data and "->" in r.data:
            try:
                after = float(r.data.rsplit("->", 1)[1])
            except ValueError:
                pass
        conn.execute(insert(table).values(
            run_id=r.id, cpu_model=None, isa=env.get("cpu_isa"), isa_flags=None, threads=env.get("threads"),
            cpus=env.get("cpus"), torch_version=env.get("torch"), load_before=env.get("load_average_1m"),
            load_after=after, quick=int("(quick" in (r.model or ""))))
        conn.execute(update(old_runs).where(old_runs.c.id == r.id).values(model=None, data=None))
        conn.execute(update(old_stages).where(old_stages.c.run_id == r.id).values(params="{}"))


def _migration_7(conn: Connection) -> None:
    """Explicit evaluations and metric declarations: ``evaluations`` and ``metric_info`` tables,
    ``metrics.origin`` and ``runs.schema``.

    Rows recorded before stay as they were (``runs.schema`` NULL); readers
    infer their evaluations and metric kinds as before (``evaluations``,
    ``metric_info``).
    """
    _add_column(conn, "runs", Column("schema", Integer))
    _add_column(conn, "metrics", Column("origin", String(16)))
    m = MetaData()
    Table("runs", m, Column("id", String(64), primary_key=True))  # exists: named for the foreign keys only
    evaluations_v7 = Table("evaluations", m,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
          Column("stage_idx", Integer, nullable=False), Column("stage", String(200), nullable=False),
          Column("kind", String(16), nullable=False), Column("split", String(200)), Column("sequences", Integer),
          Column("tokens", Integer), Column("status", String(16), nullable=False), Column("reason", Text),
          Column("started_at", String(40), nullable=False), Column("ended_at", String(40)),
          UniqueConstraint("run_id", "stage_idx", name="uq_evaluations_run_idx"))
    info_v7 = Table("metric_info", m,
          Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
          Column("name", String(200), primary_key=True), Column("higher_is_better", Integer),
          Column("unit", String(64), nullable=False, server_default=text("''")),
          Column("fraction", Integer, nullable=False, server_default=text("0")))
    m.create_all(conn, tables=[evaluations_v7, info_v7])


# Free-text columns that migrations 1-7 declared VARCHAR(n): SQLite never enforced n, PostgreSQL does.
_TEXT_SINCE_V8 = {"runs": ("recipe_name", "model", "data", "host"), "sweeps": ("name",),
                  "stages": ("name", "kind", "method"), "metrics": ("stage", "name", "layer"),
                  "evaluations": ("stage", "split"), "metric_info": ("name", "unit"), "artifacts": ("kind",),
                  "bench_machines": ("cpu_model", "isa", "torch_version")}


def _migration_8(conn: Connection) -> None:
    """Shared registries: a ``sweep_points`` table that workers claim points from, and free text unbounded.

    On PostgreSQL the names, model and data sources, layers and units
    become TEXT, so a long name is stored as SQLite always stored it
    (SQLite ignores VARCHAR lengths: nothing to change there).
    """
    if conn.dialect.name == "postgresql":
        for table, columns in _TEXT_SINCE_V8.items():
            for column in columns:
                conn.exec_driver_sql(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" TYPE TEXT')
    m = MetaData()
    Table("sweeps", m, Column("id", String(64), primary_key=True))  # exists: named for the foreign key only
    points_v8 = Table("sweep_points", m,
          Column("sweep_id", String(64), ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True),
          Column("idx", Integer, primary_key=True), Column("point", Text, nullable=False),
          Column("status", String(16), nullable=False), Column("run_id", String(64)),
          Column("attempts", Integer, nullable=False, server_default=text("0")), Column("token", String(32)),
          Column("worker_host", Text), Column("worker_pid", Integer), Column("worker_started", Double),
          Column("claimed_at", Double), Column("heartbeat_at", Double), Column("stale_after", Double),
          Column("reason", Text))
    m.create_all(conn, tables=[points_v8])


MIGRATIONS: list[Callable[[Connection], None]] = [_migration_1, _migration_2, _migration_3, _migration_4,
                                                  _migration_5, _migration_6, _migration_7, _migration_8]
SCHEMA_VERSION = len(MIGRATIONS)


def _add_column(conn: Connection, table: str, column: Column) -> None:
    """``ALTER TABLE ... ADD COLUMN`` in the connection's SQL dialect."""
    Table(table, MetaData(), column)
    spec = CreateColumn(column).compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"ALTER TABLE {conn.dialect.identifier_preparer.quote(table)} ADD COLUMN {spec}")


# -- engine and migration --------------------------------------------------------------------

def make_engine(url: str) -> Engine:
    """An engine for ``url``; for SQLite with WAL, busy timeout and ``BEGIN IMMEDIATE`` writes."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise SparsifyError(f"invalid registry URL {url!r}: {exc}") from None
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if parsed.drivername == "postgresql" and _has_module("psycopg") and not _has_module("psycopg2"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; the `postgres` extra installs psycopg 3
        parsed = parsed.set(drivername="postgresql+psycopg")
    memory = is_sqlite and parsed.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {}
    if is_sqlite:
        kwargs["connect_args"] = {"timeout": BUSY_TIMEOUT_S}
        if not memory and not parsed.database.startswith("file:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as exc:
        hint = ("pip install 'sparsify[postgres]' installs psycopg" if parsed.get_backend_name() == "postgresql"
                else "is its database driver installed?")
        raise SparsifyError(f"cannot open registry {_safe(url)}: {exc} ({hint})") from None
    if is_sqlite:
        _configure_sqlite(engine, wal=not memory)
    return engine


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _configure_sqlite(engine: Engine, *, wal: bool) -> None:
    # The SQLAlchemy recipe for pysqlite: stop the driver from managing
    # transactions itself and emit our own BEGIN (IMMEDIATE for writes).
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
            cur.execute("PRAGMA foreign_keys = ON")
            if wal and cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                _retry_locked(lambda: cur.execute("PRAGMA journal_mode = WAL"))
            # With WAL, NORMAL never corrupts; a power cut may lose the last commits only.
            cur.execute("PRAGMA synchronous = NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("sparsify_write") else "BEGIN")


def _writer(engine: Engine) -> Engine:
    """The engine whose transactions take the write lock at their start (SQLite)."""
    return engine.execution_options(sparsify_write=True)


# PostgreSQL's answers that mean "try the transaction again": serialization failure, deadlock detected
_PG_RETRY_CODES = ("40001", "40P01")


def _is_locked(exc: BaseException) -> bool:
    """A lock conflict that a retry of the whole transaction resolves (SQLite busy, PostgreSQL deadlock)."""
    orig = getattr(exc, "orig", None) or exc
    if getattr(orig, "sqlstate", None) in _PG_RETRY_CODES or getattr(orig, "pgcode", None) in _PG_RETRY_CODES:
        return True
    text = str(orig).lower()
    return "database is locked" in text or "database is busy" in text or "database table is locked" in text


def _retry_locked(fn: Callable[[], T]) -> T:
    """Run ``fn``, retrying a few times with backoff when the database is locked."""
    import sqlite3

    from sqlalchemy.exc import DBAPIError

    for attempt in range(_LOCK_RETRIES):
        try:
            return fn()
        except (DBAPIError, sqlite3.OperationalError) as exc:
            if not _is_locked(exc) or attempt == _LOCK_RETRIES - 1:
                raise
            time.sleep(0.05 * 2 ** attempt + secrets.randbelow(50) / 1000)
    raise AssertionError("unreachable")


def schema_version(conn: Connection) -> int:
    """The schema version of the database behind ``conn`` (0 when it has no registry yet)."""
    if not inspect(conn).has_table("schema_info"):
        return 0
    value = conn.execute(select(schema_info.c.version)).scalar()
    return int(value or 0)


def migrate(engine: Engine, target: int | None = None) -> int:
    """Bring the registry behind ``engine`` to schema ``target`` (default: latest); returns the version.

    A quick read decides whether there is anything to do; migrating happens in
    one write transaction that re-reads the version under the write lock, so of
    several processes opening a fresh database only the first migrates it.
    """
    target = SCHEMA_VERSION if target is None else target
    url = _safe(engine.url)
    def read_version() -> int:
        with engine.connect() as conn:
            return schema_version(conn)

    current = _retry_locked(read_version)
    _check_known(current, url)
    if current >= target:
        return current

    def run(conn: Connection) -> int:
        if conn.dialect.name == "postgresql":  # no BEGIN IMMEDIATE there: serialise on an advisory lock
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7316027)")
        version = schema_version(conn)
        _check_known(version, url)
        for v in range(version + 1, target + 1):
            MIGRATIONS[v - 1](conn)
            if v == 1:
                conn.execute(insert(schema_info).values(id=1, version=v))
            else:
                conn.execute(update(schema_info).values(version=v))
        return max(version, target)

    def attempt() -> int:
        with _writer(engine).begin() as conn:
            return run(conn)

    return _retry_locked(attempt)


def _check_known(version: int, url: str) -> None:
    if version > SCHEMA_VERSION:
        raise SparsifyError(f"the registry {url} has schema version {version}, newer than this sparsify "
                            f"knows ({SCHEMA_VERSION}): upgrade sparsify to use it")


def _safe(url) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return str(url)


# -- records -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricRecord:
    """One recorded value: ``stage_idx`` -1 is the dense baseline; ``step`` is set on training curves.

    A metric that failed has ``value`` NaN and ``error`` its one-line reason.
    """

    stage: str
    stage_idx: int
    name: str
    value: float
    layer: str | None = None
    step: int | None = None
    created_at: datetime | None = None
    error: str | None = None
    origin: str | None = None  # evaluation, stage or curve; None: recorded before v7


@dataclass(frozen=True)
class EvaluationRecord:
    """An evaluation of a run as recorded: of the dense ``reference`` (``stage_idx`` -1) or after a ``stage``."""

    stage_idx: int
    stage: str
    kind: str
    status: str
    split: str | None = None
    sequences: int | None = None
    tokens: int | None = None
    reason: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


@dataclass(frozen=True)
class Evaluation:
    """An evaluation point of a run with its summary values (no layer, no step).

    ``values``: metric name -> value (NaN when failed); ``failures``: name ->
    one-line reason of the metrics that failed there. ``record`` is the
    recorded evaluation; None for runs recorded before v7, whose points are
    inferred (see ``evaluations``).
    """

    stage_idx: int
    stage: str
    kind: str
    values: dict[str, float]
    failures: dict[str, str]
    record: EvaluationRecord | None = None


@dataclass(frozen=True)
class StageRecord:
    """A stage of a run, as far as it got."""

    idx: int
    name: str
    kind: str | None
    method: str | None
    params: dict
    status: str
    reason: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_s: float | None = None
    peak_memory_mb: float | None = None


@dataclass(frozen=True)
class ArtifactRecord:
    """A file a run produced (``output`` folder, ``checkpoint``, ``plot``...)."""

    kind: str
    path: str
    stage_idx: int | None = None
    created_at: datetime | None = None


@dataclass(frozen=True)
class SweepRecord:
    """A sweep: the recipe it expands (text, path, overrides), its grid and how many runs that makes."""

    id: str
    name: str
    recipe_text: str | None
    recipe_path: str | None
    overrides: list[str]
    grid: dict
    points: int
    created_at: datetime


@dataclass(frozen=True)
class SweepPointRecord:
    """A point of a sweep and its claim: ``status`` is one of ``SWEEP_POINT_STATUSES``.

    ``heartbeat_age_s`` is how long ago (database clock, seconds) its
    claimant last reported; ``run_id`` the run that finished or failed it last.
    """

    idx: int
    point: str
    status: str
    run_id: str | None
    attempts: int
    worker: str | None  # "host:pid" of the latest claimant
    heartbeat_age_s: float | None
    reason: str | None


@dataclass(frozen=True)
class Claim:
    """A sweep point claimed by this process (``Registry.claim_sweep_point``).

    ``resume_run`` is the point's latest unfinished run (``interrupted`` or
    ``failed``) to continue from its checkpoints, None if the point never ran
    or its last run finished. ``reclaimed_from`` names the claimant whose
    heartbeat stopped, when this claim took the point over from it.
    """

    sweep_id: str
    idx: int
    point: str
    token: str
    attempts: int
    stale_after: float
    resume_run: str | None = None
    reclaimed_from: str | None = None


@dataclass(frozen=True)
class MachineRecord:
    """The machine a bench record was measured on."""

    cpu_model: str | None
    isa: str | None
    isa_flags: list[str]
    threads: int | None
    cpus: int | None
    torch_version: str | None
    load_before: float | None = None
    load_after: float | None = None
    quick: bool = False

    @property
    def summary(self) -> str:
        """One line: ``"<cpu model>, avx2, 4 threads"`` (and whether it was a smoke run)."""
        parts = [p for p in (self.cpu_model, self.isa) if p]
        if self.threads is not None:
            parts.append(threads_text(self.threads))
        return ", ".join(parts) + (" (quick: not a measurement)" if self.quick else "")


@dataclass
class RunRecord:
    """A run with everything recorded about it (``stages``, ``metrics`` and ``artifacts`` in order)."""

    id: str
    recipe_name: str
    recipe_hash: str | None
    recipe_text: str | None
    recipe_json: str | None
    overrides: list[str]
    model: str | None
    data: str | None
    seed: int | None
    status: str
    reason: str | None
    started_at: datetime
    ended_at: datetime | None
    versions: dict
    git_commit: str | None
    host: str | None
    pid: int | None
    output_dir: str | None
    workdir: str | None
    attempts: int
    sweep_id: str | None
    recipe_path: str | None = None
    kind: str = "recipe"  # or "bench": kernel timings recorded by ``sparsify bench --record``
    sweep_point: dict | None = None  # the grid values this run sets, in a sweep
    machine: MachineRecord | None = None  # bench records: where they were measured
    schema: int | None = None  # the schema version it was recorded with; None: before v7
    stages: list[StageRecord] = field(default_factory=list)
    metrics: list[MetricRecord] = field(default_factory=list)
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    evaluations: list[EvaluationRecord] = field(default_factory=list)
    metric_info: dict[str, MetricInfo] = field(default_factory=dict)

    @property
    def recipe(self) -> dict:
        """The effective recipe (after overrides) as a dict; empty when not recorded."""
        try:
            return json.loads(self.recipe_json) if self.recipe_json else {}
        except ValueError:
            return {}

    @property
    def duration_s(self) -> float | None:
        """Wall time from start to end (to now while running)."""
        end = self.ended_at or (_utcnow() if self.status == "running" else None)
        return (end - self.started_at).total_seconds() if end else None


# -- the registry ------------------------------------------------------------------------------

class Registry:
    """The run registry at ``url`` (default: ``default_url()``), migrated to the latest schema on open."""

    def __init__(self, url: str | None = None):
        self.url = as_url(url or default_url())
        self.engine = make_engine(self.url)
        self._write_engine = _writer(self.engine)
        try:
            migrate(self.engine)
        except OperationalError as exc:
            self.engine.dispose()
            raise SparsifyError(f"cannot open registry {_safe(self.url)}: {exc.orig}") from None

    def __repr__(self) -> str:
        return f"Registry({_safe(self.url)!r})"

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    # -- transactions --

    def _write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one write transaction, retried when the database stays locked."""
        def attempt() -> T:
            with self._write_engine.begin() as conn:
                return fn(conn)
        return _retry_locked(attempt)

    def _read(self, fn: Callable[[Connection], T]) -> T:
        def attempt() -> T:
            with self.engine.connect() as conn:
                return fn(conn)
        return _retry_locked(attempt)

    # -- runs: what the engine records --

    def create_run(self, *, recipe_name: str, recipe_hash: str | None, recipe_text: str | None,
                   recipe_json: str | Mapping | None, overrides: Sequence[str] | None, model: str | None,
                   data: str | None, seed: int | None, output_dir: str | None, workdir: str | None,
                   recipe_path: str | os.PathLike | None = None, sweep_id: str | None = None,
                   kind: str = "recipe", sweep_point: str | None = None) -> str:
        """Record a new run, ``running`` in this process; returns its id.

        ``kind`` is ``recipe`` for ``sparsify run`` and ``bench`` for recorded
        benchmarks (their stages are the bench cases). A run of a sweep has its
        ``sweep_id`` and ``sweep_point`` (JSON of the grid values it sets).

        Also records the versions of python/torch/transformers/sparsify, the
        git commit of the repository holding ``recipe_path`` (if any), and this
        host and process.
        """
        now = _utcnow()
        proc = _this_process()
        row = dict(recipe_name=recipe_name, recipe_hash=recipe_hash, recipe_text=recipe_text,
                   recipe_json=recipe_json if recipe_json is None or isinstance(recipe_json, str)
                   else json.dumps(recipe_json, sort_keys=True, default=str),
                   overrides=json.dumps(list(overrides or [])), model=model, data=data, seed=seed,
                   status="running", started_at=_iso(now), versions=json.dumps(environment_versions()),
                   git_commit=git_commit(recipe_path), output_dir=_str(output_dir), workdir=_str(workdir),
                   attempts=1, sweep_id=sweep_id, recipe_path=_recipe_path(recipe_path), kind=kind,
                   sweep_point=sweep_point, schema=SCHEMA_VERSION, **proc)
        for _ in range(5):
            run_id = new_run_id(now)
            try:
                self._write(lambda conn: conn.execute(insert(runs).values(id=run_id, **row)))
                return run_id
            except IntegrityError:  # the same random suffix in the same minute: draw again
                continue
        raise SparsifyError(f"could not allocate a new run id in {_safe(self.url)}")

    # -- sweeps --

    def create_sweep(self, *, name: str, recipe_text: str | None, recipe_path: str | os.PathLike | None,
                     overrides: Sequence[str] | None, grid: Mapping, points: int) -> str:
        """Record a new sweep (its runs are recorded with ``create_run(sweep_id=...)``); returns its id."""
        now = _utcnow()
        row = dict(name=name, recipe_text=recipe_text, recipe_path=_recipe_path(recipe_path),
                   overrides=json.dumps(list(overrides or [])), grid=json.dumps(dict(grid), default=str),
                   points=int(points), created_at=_iso(now))
        for _ in range(5):
            sweep_id = "sweep-" + new_run_id(now)
            try:
                self._write(lambda conn: conn.execute(insert(sweeps).values(id=sweep_id, **row)))
                return sweep_id
            except IntegrityError:
                continue
        raise SparsifyError(f"could not allocate a new sweep id in {_safe(self.url)}")

    def get_sweep(self, sweep_id: str) -> SweepRecord:
        """The sweep with id (or unique id prefix) ``sweep_id``."""
        def get(conn: Connection) -> SweepRecord:
            rows = conn.execute(select(sweeps).where(sweeps.c.id == sweep_id)).all() or conn.execute(
                select(sweeps).where(sweeps.c.id.startswith(sweep_id, autoescape=True)).limit(6)).all()
            if len(rows) != 1:
                ids = conn.execute(select(sweeps.c.id)).scalars().all()
                if rows:
                    raise SparsifyError(f"sweep id {sweep_id!r} is ambiguous: it starts "
                                        + ", ".join(r.id for r in rows[:5]))
                close = difflib.get_close_matches(sweep_id, ids, n=3, cutoff=0.6)
                hint = " (did you mean " + " or ".join(repr(c) for c in close) + "?)" if close else ""
                raise SparsifyError(f"no sweep {sweep_id!r} in {_safe(self.url)}{hint}")
            return _sweep_record(rows[0])

        return self._read(get)

    def find_sweeps(self, limit: int | None = None) -> list[SweepRecord]:
        """Recorded sweeps, newest first."""
        query = select(sweeps).order_by(sweeps.c.created_at.desc(), sweeps.c.id.desc())
        if limit is not None:
            query = query.limit(limit)
        return self._read(lambda conn: [_sweep_record(r) for r in conn.execute(query).all()])

    def set_run_paths(self, run_id: str, *, workdir: str | os.PathLike | None = None,
                      output_dir: str | os.PathLike | None = None) -> None:
        """Record the run's scratch folder and/or output folder (those given)."""
        values = {k: str(v) for k, v in (("workdir", workdir), ("output_dir", output_dir)) if v is not None}
        if values:
            self._update_run(run_id, values)

    def resume_run(self, run_id: str) -> None:
        """Mark a stopped run ``running`` again in this process: attempts + 1, unfinished stages ``pending``."""
        proc = _this_process()

        def resume(conn: Connection) -> None:
            res = conn.execute(update(runs).where(runs.c.id == run_id, runs.c.status != "running")
                               .values(status="running", reason=None, ended_at=None,
                                       attempts=runs.c.attempts + 1, **proc))
            if res.rowcount == 0:
                row = conn.execute(select(runs.c.pid, runs.c.host).where(runs.c.id == run_id)).first()
                if row is None:
                    raise self._unknown(conn, run_id)
                raise SparsifyError(f"run {run_id} is already running (pid {row.pid} on {row.host})")
            conn.execute(update(stages)
                         .where(stages.c.run_id == run_id, stages.c.status.in_(("running", "interrupted", "failed")))
                         .values(status="pending", reason=None, ended_at=None))

        self._write(resume)

    def set_run_status(self, run_id: str, status: str, reason: str | None = None) -> None:
        """Set a run's status (``ended_at`` is set for terminal ones).

        A run that ends ``failed``/``interrupted`` takes any stage or
        evaluation still ``running`` with it, so nothing stays ``running``
        after its process.
        """
        _check_status(status, RUN_STATUSES, "run")
        now = _iso(_utcnow())
        ended = now if status in TERMINAL_STATUSES else None

        def set_status(conn: Connection) -> None:
            res = conn.execute(update(runs).where(runs.c.id == run_id)
                               .values(status=status, reason=reason, ended_at=ended))
            if res.rowcount == 0:
                raise self._unknown(conn, run_id)
            if status in ("failed", "interrupted"):
                for table in (stages, evaluations):
                    conn.execute(update(table).where(table.c.run_id == run_id, table.c.status == "running")
                                 .values(status=status, reason=reason, ended_at=now))

        self._write(set_status)

    # -- stages --

    def start_stage(self, run_id: str, idx: int, *, name: str, kind: str | None, method: str | None,
                    params: Mapping | None) -> None:
        """Record stage ``idx`` as ``running`` from now (re-starting it if it was recorded before)."""
        values = dict(name=name, kind=kind, method=method, params=json.dumps(dict(params or {}), default=str),
                      status="running", reason=None, started_at=_iso(_utcnow()), ended_at=None,
                      duration_s=None, peak_memory_mb=None)

        self._write(lambda conn: _upsert(conn, stages, dict(run_id=run_id, idx=idx), values))

    def finish_stage(self, run_id: str, idx: int, status: str, *, duration_s: float | None = None,
                     peak_memory_mb: float | None = None, reason: str | None = None) -> None:
        """Record the end of stage ``idx`` (``completed``, ``failed`` or ``interrupted``)."""
        _check_status(status, STAGE_STATUSES, "stage")
        now = _utcnow()

        def finish(conn: Connection) -> None:
            started = conn.execute(select(stages.c.started_at)
                                   .where(stages.c.run_id == run_id, stages.c.idx == idx)).first()
            if started is None:
                raise SparsifyError(f"run {run_id} has no stage {idx} to finish (start_stage first)")
            seconds = duration_s
            if seconds is None and started.started_at:
                seconds = (now - _parse(started.started_at)).total_seconds()
            conn.execute(update(stages).where(stages.c.run_id == run_id, stages.c.idx == idx)
                         .values(status=status, reason=reason, ended_at=_iso(now), duration_s=seconds,
                                 peak_memory_mb=peak_memory_mb))

        self._write(finish)

    # -- metrics and artifacts --

    def log_metrics(self, run_id: str, stage: str, stage_idx: int,
                    values: Mapping[str, float] | Iterable[Any], step: int | None = None, *,
                    info: Mapping[str, MetricInfo] | None = None, origin: str | None = None) -> None:
        """Record metric values of ``stage`` (``dense``/-1 for the baseline) in one transaction.

        ``values`` is a dict name -> number, or a list of ``MetricValue``
        (name, value, layer, error: the reason of a failed metric). ``step``
        marks points of a training curve. ``origin`` says who measured them
        (``METRIC_ORIGINS``; default ``curve`` with a step, else ``stage``:
        a stage's own numbers, never taken for an evaluation; evaluations are
        recorded with ``start_evaluation``/``record_evaluation``). ``info``
        declares what names are (``record_metric_info``), in the same transaction.
        Raises ``SparsifyError`` for a value that is not a number or an unknown origin.
        """
        origin = origin or ("curve" if step is not None else "stage")
        _check_status(origin, METRIC_ORIGINS, "metric origin")
        now = _iso(_utcnow())
        if isinstance(values, Mapping):
            items = [(name, value, None, None) for name, value in values.items()]
        else:
            items = [(v.name, v.value, getattr(v, "layer", None), getattr(v, "error", None)) for v in values]
        rows = [dict(run_id=run_id, stage=stage, stage_idx=stage_idx, step=None if step is None else int(step),
                     name=str(name), value=_as_float(name, value), layer=None if layer is None else str(layer),
                     error=None if error is None else str(error), created_at=now, origin=origin)
                for name, value, layer, error in items]

        def log(conn: Connection) -> None:
            if rows:
                conn.execute(insert(metrics), rows)
            if info:
                _upsert_info(conn, run_id, info)

        if rows or info:
            self._write(log)

    def record_metric_info(self, run_id: str, info: Mapping[str, MetricInfo]) -> None:
        """Record what the run's metric names are (``MetricInfo``); a later record of a name replaces it."""
        if info:
            self._write(lambda conn: _upsert_info(conn, run_id, info))

    # -- evaluations --

    def start_evaluation(self, run_id: str, stage_idx: int, *, stage: str, kind: str, split: str | None = None,
                         sequences: int | None = None, tokens: int | None = None) -> None:
        """Record the evaluation at ``stage_idx`` (-1 and kind ``reference`` for the dense model) as ``running``.

        ``kind`` is ``reference`` or ``stage`` (``EVALUATION_KINDS``); an
        evaluation recorded before at the same index (a resumed run) is
        started again. Its values follow with ``log_metrics(...,
        origin="evaluation")``; ``finish_evaluation`` ends it.
        """
        _check_status(kind, EVALUATION_KINDS, "evaluation kind")
        values = dict(stage=stage, kind=kind, split=split, sequences=sequences, tokens=tokens, status="running",
                      reason=None, started_at=_iso(_utcnow()), ended_at=None)

        def start(conn: Connection) -> None:
            _upsert(conn, evaluations, dict(run_id=run_id, stage_idx=stage_idx), values)
            # a re-run evaluation replaces the values of the earlier one
            conn.execute(metrics.delete().where(metrics.c.run_id == run_id, metrics.c.stage_idx == stage_idx,
                                                metrics.c.origin == "evaluation"))

        self._write(start)

    def finish_evaluation(self, run_id: str, stage_idx: int, status: str = "completed",
                          reason: str | None = None) -> None:
        """Record the end of the evaluation at ``stage_idx`` (``completed``, ``failed`` or ``interrupted``)."""
        _check_status(status, EVALUATION_STATUSES, "evaluation")

        def finish(conn: Connection) -> None:
            res = conn.execute(update(evaluations)
                               .where(evaluations.c.run_id == run_id, evaluations.c.stage_idx == stage_idx)
                               .values(status=status, reason=reason, ended_at=_iso(_utcnow())))
            if res.rowcount == 0:
                raise SparsifyError(f"run {run_id} has no evaluation at stage {stage_idx} to finish "
                                    "(start_evaluation first)")

        self._write(finish)

    def record_evaluation(self, run_id: str, stage: str, stage_idx: int, values: Mapping[str, float] | Iterable[Any],
                          *, info: Mapping[str, MetricInfo] | None = None, split: str | None = None,
                          sequences: int | None = None, tokens: int | None = None) -> None:
        """Record a whole, completed evaluation at once: ``start_evaluation``, its values, ``finish_evaluation``.

        The kind is ``reference`` at ``stage_idx`` -1, else ``stage``. For
        importing results and for tests; the runner records the steps as they happen.
        """
        kind = "reference" if stage_idx == DENSE_INDEX else "stage"
        self.start_evaluation(run_id, stage_idx, stage=stage, kind=kind, split=split, sequences=sequences,
                              tokens=tokens)
        self.log_metrics(run_id, stage, stage_idx, values, info=info, origin="evaluation")
        self.finish_evaluation(run_id, stage_idx)

    def record_machine(self, run_id: str, *, cpu_model: str | None, isa: str | None,
                       isa_flags: Sequence[str] | None, threads: int | None, cpus: int | None,
                       torch_version: str | None, load_before: float | None = None, load_after: float | None = None,
                       quick: bool = False) -> None:
        """Record the machine bench record ``run_id`` was measured on (its ``RunRecord.machine``)."""
        self._write(lambda conn: conn.execute(insert(bench_machines).values(
            run_id=run_id, cpu_model=cpu_model, isa=isa, isa_flags=json.dumps(list(isa_flags or [])),
            threads=threads, cpus=cpus, torch_version=torch_version, load_before=load_before,
            load_after=load_after, quick=int(bool(quick)))))

    def add_artifact(self, run_id: str, kind: str, path: str | os.PathLike, stage_idx: int | None = None) -> None:
        """Record a file or folder the run produced."""
        self._write(lambda conn: conn.execute(insert(artifacts).values(
            run_id=run_id, kind=kind, path=str(path), stage_idx=stage_idx, created_at=_iso(_utcnow()))))

    # -- sweep points: how several processes share a sweep --

    def add_sweep_points(self, sweep_id: str, points: Sequence[str]) -> None:
        """Record the points of sweep ``sweep_id`` (canonical JSON of each one's grid values, in grid order).

        Idempotent: points recorded before stay as they are. Points of sweeps
        started before schema v8 take their state from the runs recorded for
        them: ``finished`` if one finished, ``running`` (to be reclaimed once
        ``STALE_AFTER_S`` passes without a heartbeat) if one is running,
        else ``pending``. Raises ``SparsifyError`` when a recorded point
        differs from the one given at its index (the sweep's recipe changed).
        """
        def add(conn: Connection) -> None:
            known = {r.idx: r.point for r in conn.execute(
                select(sweep_points.c.idx, sweep_points.c.point).where(sweep_points.c.sweep_id == sweep_id))}
            for idx, point in enumerate(points):
                if idx in known:
                    if known[idx] != point:
                        raise SparsifyError(f"sweep {sweep_id}: point {idx} is recorded as {known[idx]}, "
                                            f"but its recipe now expands it to {point}")
                    continue
                latest = conn.execute(select(runs.c.id, runs.c.status, runs.c.host, runs.c.pid,
                                             runs.c.pid_started_at)
                                      .where(runs.c.sweep_id == sweep_id, runs.c.sweep_point == point)
                                      .order_by((runs.c.status == "finished").desc(), runs.c.started_at.desc())
                                      .limit(1)).first()
                row = dict(point=point, status="pending", attempts=0)
                if latest is not None and latest.status == "finished":
                    row.update(status="finished", run_id=latest.id)
                elif latest is not None and latest.status == "running":  # recorded by a process without heartbeats
                    row.update(status="running", token=secrets.token_hex(8), worker_host=latest.host,
                               worker_pid=latest.pid, worker_started=latest.pid_started_at,
                               heartbeat_at=_db_seconds(conn), stale_after=STALE_AFTER_S, attempts=1)
                # another process may add the same points at the same moment: the first one's rows stay
                _upsert(conn, sweep_points, dict(sweep_id=sweep_id, idx=idx), row, replace=False)

        self._write(add)

    def sweep_points(self, sweep_id: str) -> list[SweepPointRecord]:
        """The recorded points of sweep ``sweep_id`` in grid order (empty if none are recorded yet)."""
        def read(conn: Connection) -> list[SweepPointRecord]:
            now = _db_seconds(conn)
            return [SweepPointRecord(
                idx=r.idx, point=r.point, status=r.status, run_id=r.run_id, attempts=r.attempts,
                worker=f"{r.worker_host}:{r.worker_pid}" if r.worker_host else None,
                heartbeat_age_s=None if r.heartbeat_at is None else max(0.0, now - r.heartbeat_at), reason=r.reason)
                for r in conn.execute(select(sweep_points).where(sweep_points.c.sweep_id == sweep_id)
                                      .order_by(sweep_points.c.idx))]

        return self._read(read)

    def retry_failed_sweep_points(self, sweep_id: str) -> int:
        """Make the ``failed`` points of sweep ``sweep_id`` ``pending`` again; returns how many."""
        return self._write(lambda conn: conn.execute(
            update(sweep_points).where(sweep_points.c.sweep_id == sweep_id, sweep_points.c.status == "failed")
            .values(status="pending", token=None)).rowcount)

    def claim_sweep_point(self, sweep_id: str, *, stale_after: float = STALE_AFTER_S) -> Claim | None:
        """Claim the first point of sweep ``sweep_id`` nobody works on; None when there is none.

        Claimable are ``pending`` points and ``running`` ones whose claimant
        is dead: no heartbeat for that claim's own ``stale_after`` seconds
        (database clock, so the machines' clocks do not matter), or a process
        on this host that has ended. Atomic across processes and machines:
        ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL (concurrent
        claimants take different rows without waiting) and, on every
        database, an ``UPDATE`` that succeeds only if the row is still in the
        state it was read in. A reclaimed point's runs still marked
        ``running`` become ``interrupted``, with whose heartbeat stopped.
        The claimant must ``beat_sweep_point`` well within ``stale_after``
        seconds and end with ``settle_sweep_point``.
        """
        host, me = socket.gethostname(), _this_process()
        self._expire_dead_claims(sweep_id, host)

        def claim(conn: Connection) -> Claim | None:
            now = _db_seconds(conn)
            for _ in range(32):  # each miss means another claimant won that row: try the next one
                row = conn.execute(
                    select(sweep_points).where(
                        sweep_points.c.sweep_id == sweep_id,
                        (sweep_points.c.status == "pending")
                        | ((sweep_points.c.status == "running")
                           & (sweep_points.c.heartbeat_at + sweep_points.c.stale_after < now)))
                    .order_by(sweep_points.c.idx).limit(1).with_for_update(skip_locked=True)).first()
                if row is None:
                    return None
                token = secrets.token_hex(8)
                won = conn.execute(update(sweep_points).where(
                    sweep_points.c.sweep_id == sweep_id, sweep_points.c.idx == row.idx,
                    sweep_points.c.status == row.status, _same(sweep_points.c.token, row.token))
                    .values(status="running", token=token, attempts=sweep_points.c.attempts + 1,
                            worker_host=me["host"], worker_pid=me["pid"], worker_started=me["pid_started_at"],
                            claimed_at=now, heartbeat_at=now, stale_after=float(stale_after), reason=None)).rowcount
                if not won:
                    continue
                reclaimed = None
                if row.status == "running":
                    reclaimed = f"{row.worker_host}:{row.worker_pid}"
                    age = now - (row.heartbeat_at or now)
                    why = (f"its worker {reclaimed} stopped (no heartbeat for {age:.0f} s); the sweep point was "
                           f"reclaimed by {me['host']}:{me['pid']}")
                    conn.execute(update(sweep_points).where(sweep_points.c.sweep_id == sweep_id,
                                                            sweep_points.c.idx == row.idx)
                                 .values(reason=f"reclaimed from {reclaimed} (no heartbeat for {age:.0f} s)"))
                    self._interrupt_point_runs(conn, sweep_id, row.point, why)
                latest = conn.execute(select(runs.c.id, runs.c.status)
                                      .where(runs.c.sweep_id == sweep_id, runs.c.sweep_point == row.point)
                                      .order_by(runs.c.started_at.desc()).limit(1)).first()
                resume = latest.id if latest is not None and latest.status in ("interrupted", "failed") else None
                return Claim(sweep_id, row.idx, row.point, token, row.attempts + 1, float(stale_after), resume,
                             reclaimed)
            return None

        return self._write(claim)

    def beat_sweep_point(self, claim: Claim) -> bool:
        """The heartbeat of a claimed point; False when the claim was lost (reclaimed after a stall)."""
        def beat(conn: Connection) -> bool:
            return conn.execute(update(sweep_points).where(*_held(claim))
                                .values(heartbeat_at=_db_seconds(conn))).rowcount == 1

        return self._write(beat)

    def settle_sweep_point(self, claim: Claim, status: str, *, run_id: str | None = None,
                           reason: str | None = None) -> bool:
        """End a claim: the point ``finished`` or ``failed`` by ``run_id``, or ``pending`` again (released).

        ``reason`` (why it failed or was released) replaces the point's note;
        without one the note the claim left stays.

        Returns False (and changes nothing) when the claim was lost to
        another claimant meanwhile. Raises ``SparsifyError`` for another status.
        """
        _check_status(status, ("finished", "failed", "pending"), "sweep point")

        def settle(conn: Connection) -> bool:
            values: dict[str, Any] = dict(status=status, token=None)
            if run_id is not None:
                values["run_id"] = run_id
            if reason is not None:  # else the claim's own note stays (whom it was reclaimed from)
                values["reason"] = reason
            return conn.execute(update(sweep_points).where(*_held(claim)).values(**values)).rowcount == 1

        return self._write(settle)

    def _expire_dead_claims(self, sweep_id: str, host: str) -> None:
        """Claims of processes on this host that have ended need not wait out their heartbeat timeout."""
        rows = self._read(lambda conn: conn.execute(
            select(sweep_points.c.idx, sweep_points.c.token, sweep_points.c.worker_pid,
                   sweep_points.c.worker_started)
            .where(sweep_points.c.sweep_id == sweep_id, sweep_points.c.status == "running",
                   sweep_points.c.worker_host == host)).all())
        dead = [r for r in rows if r.worker_pid is not None and not _process_alive(r.worker_pid, r.worker_started)]
        if dead:
            def expire(conn: Connection) -> None:
                for r in dead:
                    conn.execute(update(sweep_points).where(
                        sweep_points.c.sweep_id == sweep_id, sweep_points.c.idx == r.idx,
                        sweep_points.c.status == "running", sweep_points.c.token == r.token)
                        .values(heartbeat_at=0.0))  # the epoch: stale for any timeout
            self._write(expire)

    @staticmethod
    def _interrupt_point_runs(conn: Connection, sweep_id: str, point: str, reason: str) -> None:
        now = _iso(_utcnow())
        ids = conn.execute(select(runs.c.id).where(runs.c.sweep_id == sweep_id, runs.c.sweep_point == point,
                                                   runs.c.status == "running")).scalars().all()
        for run_id in ids:
            conn.execute(update(runs).where(runs.c.id == run_id, runs.c.status == "running")
                         .values(status="interrupted", reason=reason, ended_at=now))
            for table in (stages, evaluations):
                conn.execute(update(table).where(table.c.run_id == run_id, table.c.status == "running")
                             .values(status="interrupted", reason=reason, ended_at=now))

    # -- reading --

    def get_run(self, run_id: str) -> RunRecord:
        """The run with id (or unique id prefix) ``run_id``, with stages, metrics and artifacts.

        Reconciles first, so a run whose process died shows as ``interrupted``.
        """
        self.reconcile()

        def get(conn: Connection) -> RunRecord:
            full = self._resolve(conn, run_id)
            row = conn.execute(select(runs).where(runs.c.id == full)).one()
            return self._records(conn, [row], details=True)[0]

        return self._read(get)

    def find_runs(self, ids: Iterable[str] | None = None, recipe_names: Iterable[str] | None = None,
                  models: Iterable[str] | None = None, status: str | Iterable[str] | None = None,
                  limit: int | None = None, *, sweep_id: str | None = None, kinds: Iterable[str] | None = None,
                  details: bool = True) -> list[RunRecord]:
        """Runs matching all given filters, newest first (``ids`` may be unique prefixes).

        ``kinds`` selects ``recipe`` runs and/or ``bench`` records (default: both).

        ``details=False`` skips loading stages, metrics and artifacts (for listings).
        Reconciles first, like ``get_run``.
        """
        self.reconcile()

        def find(conn: Connection) -> list[RunRecord]:
            query = select(runs)
            if ids is not None:
                query = query.where(runs.c.id.in_([self._resolve(conn, i) for i in ids]))
            if recipe_names is not None:
                query = query.where(runs.c.recipe_name.in_(list(recipe_names)))
            if models is not None:
                query = query.where(runs.c.model.in_(list(models)))
            if status is not None:
                wanted = [status] if isinstance(status, str) else list(status)
                for s in wanted:
                    _check_status(s, RUN_STATUSES, "run")
                query = query.where(runs.c.status.in_(wanted))
            if sweep_id is not None:
                query = query.where(runs.c.sweep_id == sweep_id)
            if kinds is not None:
                query = query.where(runs.c.kind.in_(list(kinds)))
            query = query.order_by(runs.c.started_at.desc(), runs.c.id.desc())
            if limit is not None:
                query = query.limit(limit)
            return self._records(conn, conn.execute(query).all(), details=details)

        return self._read(find)

    def reconcile(self) -> list[str]:
        """Mark ``interrupted`` the runs ``running`` on this host whose process has ended; returns their ids.

        A process counts as ended when its pid is gone, a zombie, or now
        belongs to a process started at another time (a reused pid). Runs on
        other hosts cannot be checked from here and are left alone.
        """
        host = socket.gethostname()
        rows = self._read(lambda conn: conn.execute(
            select(runs.c.id, runs.c.pid, runs.c.pid_started_at, runs.c.attempts)
            .where(runs.c.status == "running", runs.c.host == host)).all())
        dead = [r for r in rows if r.pid is not None and not _process_alive(r.pid, r.pid_started_at)]
        if not dead:
            return []
        now = _iso(_utcnow())

        def mark(conn: Connection) -> list[str]:
            marked = []
            for r in dead:  # only if nobody resumed it in the meantime
                res = conn.execute(update(runs).where(runs.c.id == r.id, runs.c.status == "running",
                                                      runs.c.pid == r.pid, runs.c.attempts == r.attempts)
                                   .values(status="interrupted", reason=DEAD_PROCESS_REASON, ended_at=now))
                if res.rowcount:
                    for table in (stages, evaluations):
                        conn.execute(update(table).where(table.c.run_id == r.id, table.c.status == "running")
                                     .values(status="interrupted", reason=DEAD_PROCESS_REASON, ended_at=now))
                    marked.append(r.id)
            return marked

        return self._write(mark)

    # -- helpers --

    def _update_run(self, run_id: str, values: dict) -> None:
        def upd(conn: Connection) -> None:
            if conn.execute(update(runs).where(runs.c.id == run_id).values(**values)).rowcount == 0:
                raise self._unknown(conn, run_id)
        self._write(upd)

    def _resolve(self, conn: Connection, run_id: str) -> str:
        """The full id of the run ``run_id`` names (exactly or as a unique prefix)."""
        if not run_id:
            raise SparsifyError("a run id (or a unique prefix of one) is needed")
        if conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first():
            return run_id
        found = conn.execute(select(runs.c.id).where(runs.c.id.startswith(run_id, autoescape=True))
                             .order_by(runs.c.id).limit(6)).scalars().all()
        if len(found) == 1:
            return found[0]
        if found:
            shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
            raise SparsifyError(f"run id {run_id!r} is ambiguous in {_safe(self.url)}: it starts {shown}")
        raise self._unknown(conn, run_id)

    def _unknown(self, conn: Connection, run_id: str) -> SparsifyError:
        ids = conn.execute(select(runs.c.id)).scalars().all()
        close = difflib.get_close_matches(run_id, ids, n=3, cutoff=0.6)
        hint = " (did you mean " + " or ".join(repr(c) for c in close) + "?)" if close else ""
        return SparsifyError(f"no run {run_id!r} in {_safe(self.url)}{hint}")

    @staticmethod
    def _records(conn: Connection, rows, *, details: bool) -> list[RunRecord]:
        records = [_run_record(r) for r in rows]
        by_id = {r.id: r for r in records}
        bench_ids = [r.id for r in records if r.kind == "bench"]
        for chunk in _chunks(bench_ids, 500):  # listings show where a bench record was measured too
            for b in conn.execute(select(bench_machines).where(bench_machines.c.run_id.in_(chunk))):
                by_id[b.run_id].machine = MachineRecord(
                    cpu_model=b.cpu_model, isa=b.isa, isa_flags=_loads(b.isa_flags, []), threads=b.threads,
                    cpus=b.cpus, torch_version=b.torch_version, load_before=b.load_before, load_after=b.load_after,
                    quick=bool(b.quick))
        if not details or not records:
            return records
        for chunk in _chunks(list(by_id), 500):  # stay under the bound-parameter limit
            for s in conn.execute(select(stages).where(stages.c.run_id.in_(chunk)).order_by(stages.c.idx)):
                by_id[s.run_id].stages.append(StageRecord(
                    idx=s.idx, name=s.name, kind=s.kind, method=s.method, params=_loads(s.params, {}),
                    status=s.status, reason=s.reason, started_at=_parse(s.started_at), ended_at=_parse(s.ended_at),
                    duration_s=s.duration_s, peak_memory_mb=s.peak_memory_mb))
            for m in conn.execute(select(metrics).where(metrics.c.run_id.in_(chunk)).order_by(metrics.c.id)):
                by_id[m.run_id].metrics.append(MetricRecord(
                    stage=m.stage, stage_idx=m.stage_idx, name=m.name,
                    value=math.nan if m.value is None else float(m.value), layer=m.layer, step=m.step,
                    created_at=_parse(m.created_at), error=m.error, origin=m.origin))
            for e in conn.execute(select(evaluations).where(evaluations.c.run_id.in_(chunk))
                                  .order_by(evaluations.c.stage_idx)):
                by_id[e.run_id].evaluations.append(EvaluationRecord(
                    stage_idx=e.stage_idx, stage=e.stage, kind=e.kind, status=e.status, split=e.split,
                    sequences=e.sequences, tokens=e.tokens, reason=e.reason, started_at=_parse(e.started_at),
                    ended_at=_parse(e.ended_at)))
            for i in conn.execute(select(metric_info).where(metric_info.c.run_id.in_(chunk))):
                by_id[i.run_id].metric_info[i.name] = MetricInfo(
                    higher_is_better=None if i.higher_is_better is None else bool(i.higher_is_better),
                    unit=i.unit or "", fraction=bool(i.fraction))
            for a in conn.execute(select(artifacts).where(artifacts.c.run_id.in_(chunk)).order_by(artifacts.c.id)):
                by_id[a.run_id].artifacts.append(ArtifactRecord(kind=a.kind, path=a.path, stage_idx=a.stage_idx,
                                                                created_at=_parse(a.created_at)))
        return records


# -- reading evaluations and metric declarations ------------------------------------------------
# The one place that knows how runs recorded before v7 (``RunRecord.schema`` None) are read.

# Before v7 a metric's kind was guessed from words in its name; only for runs recorded then.
_LEGACY_LOWER_IS_BETTER = ("perplexity", "kl", "loss", "error", "flops", "parameters", "seconds", "memory",
                           "latency", "bytes", "time")
_LEGACY_FRACTIONS = ("sparsity", "density", "fraction", "accuracy", "ratio")


def evaluation_points(record: RunRecord) -> list[Evaluation]:
    """The run's completed evaluations in stage order, the dense reference (-1) first, with their values.

    Runs recorded since v7 list their ``evaluations`` rows and the values
    those wrote (``origin`` ``evaluation``); numbers the stages reported
    themselves are not among them (``stage_values``). Fallback for runs
    recorded before v7, which kept no such rows: every stage index with
    summary values (no layer, no step) is a point, as ``show`` always listed
    them, stage numbers included; ``final_evaluation`` then tells evaluated
    stages from the others as those releases did.
    """
    if record.schema is None:
        points: dict[int, dict[str, float]] = {}
        failures: dict[int, dict[str, str]] = {}
        for m in record.metrics:
            if m.layer is None and m.step is None:
                _add_value(points.setdefault(m.stage_idx, {}), failures.setdefault(m.stage_idx, {}), m)
        return [Evaluation(idx, _legacy_stage_name(record, idx), "reference" if idx == DENSE_INDEX else "stage",
                           values, failures[idx]) for idx, values in sorted(points.items())]
    done = {e.stage_idx: e for e in record.evaluations if e.status == "completed"}
    values = {idx: {} for idx in done}
    failed: dict[int, dict[str, str]] = {idx: {} for idx in done}
    for m in record.metrics:
        if m.origin == "evaluation" and m.layer is None and m.step is None and m.stage_idx in done:
            _add_value(values[m.stage_idx], failed[m.stage_idx], m)
    return [Evaluation(idx, e.stage, e.kind, values[idx], failed[idx], e) for idx, e in sorted(done.items())]


def reference_evaluation(record: RunRecord) -> Evaluation | None:
    """The evaluation of the dense model the run started from (stage index -1); None if not recorded."""
    return next((e for e in evaluation_points(record) if e.stage_idx == DENSE_INDEX), None)


def final_evaluation(record: RunRecord) -> Evaluation | None:
    """The run's final point: its last completed evaluation after a stage (None if there is none).

    This is what ``compare``, the trade-off plot, ``fit`` and sweeps read a
    run's results from. For runs recorded before v7 (see ``evaluation_points``),
    stages recorded their own numbers (``stage_seconds``...) whether
    evaluated or not, so a stage counts as evaluated when it has at least
    half of the metric names of the dense baseline (the last point if the run
    has no baseline).
    """
    after = [e for e in evaluation_points(record) if e.stage_idx > DENSE_INDEX]
    if record.schema is None:
        dense = reference_evaluation(record)
        names = set(dense.values) if dense is not None else set()
        if names:
            evaluated = [e for e in after if 2 * len(names & set(e.values)) >= len(names)]
            if evaluated:
                return evaluated[-1]
    return after[-1] if after else None


def stage_values(record: RunRecord) -> dict[int, dict[str, float]]:
    """Summary numbers the stages reported themselves (``stage_seconds``, a method's own), by stage index.

    Empty for runs recorded before v7, whose evaluation points hold them (``evaluations``).
    """
    out: dict[int, dict[str, float]] = {}
    for m in record.metrics:
        if m.origin == "stage" and m.layer is None and m.step is None:
            out.setdefault(m.stage_idx, {})[m.name] = m.value
    return dict(sorted(out.items()))


def metric_info_for(records: RunRecord | Sequence[RunRecord], name: str) -> MetricInfo:
    """What metric ``name`` is, as the first of ``records`` that declared it recorded it.

    Undeclared in all of them: the old guess from words in the name if one
    of them was recorded before v7 (lower is better for ``perplexity``,
    ``loss``, ``seconds``...; fractions for ``sparsity``, ``ratio``...), else
    ``MetricInfo()`` (no direction, no unit, not a fraction).
    """
    records = [records] if isinstance(records, RunRecord) else list(records)
    for r in records:
        if name in r.metric_info:
            return r.metric_info[name]
    if any(r.schema is None for r in records):
        return MetricInfo(higher_is_better=not any(w in name for w in _LEGACY_LOWER_IS_BETTER), unit="",
                          fraction=any(w in name for w in _LEGACY_FRACTIONS))
    return MetricInfo()


def _add_value(values: dict[str, float], failures: dict[str, str], m: MetricRecord) -> None:
    """The latest value wins when logged twice; a later value clears a failure."""
    values[m.name] = m.value
    if m.error is not None:
        failures[m.name] = m.error
    else:
        failures.pop(m.name, None)


def _legacy_stage_name(record: RunRecord, stage_idx: int) -> str:
    if stage_idx == DENSE_INDEX:
        return DENSE_STAGE
    for m in record.metrics:
        if m.stage_idx == stage_idx:
            return m.stage
    for s in record.stages:
        if s.idx == stage_idx:
            return s.name
    return f"stage {stage_idx}"


def _upsert_info(conn: Connection, run_id: str, info: Mapping[str, MetricInfo]) -> None:
    for name, i in info.items():
        values = dict(higher_is_better=None if i.higher_is_better is None else int(bool(i.higher_is_better)),
                      unit=str(i.unit or ""), fraction=int(bool(i.fraction)))
        _upsert(conn, metric_info, dict(run_id=run_id, name=str(name)), values)


def _upsert(conn: Connection, table: Table, keys: Mapping[str, Any], values: Mapping[str, Any], *,
            replace: bool = True) -> None:
    """Insert the row ``keys`` + ``values``; where ``keys`` exists, update ``values`` (``replace``) or keep it.

    One ``INSERT ... ON CONFLICT`` statement on SQLite and PostgreSQL, so two
    writers of the same new key cannot both insert it (nor fail on it);
    other databases look first and then update or insert.
    """
    if conn.dialect.name in ("sqlite", "postgresql"):
        if conn.dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        stmt = dialect_insert(table).values(**keys, **values)
        stmt = (stmt.on_conflict_do_update(index_elements=list(keys), set_=dict(values)) if replace
                else stmt.on_conflict_do_nothing(index_elements=list(keys)))
        conn.execute(stmt)
        return
    where = [table.c[k] == v for k, v in keys.items()]
    if conn.execute(select(*[table.c[k] for k in keys]).where(*where)).first():
        if replace:
            conn.execute(update(table).where(*where).values(**values))
        return
    conn.execute(insert(table).values(**keys, **values))


# -- small helpers -----------------------------------------------------------------------------

def new_run_id(now: datetime | None = None) -> str:
    """A short run id, ``YYYYMMDD-HHMM-xxxxxx`` (UTC start time + 6 random hex digits)."""
    now = now or _utcnow()
    return f"{now:%Y%m%d-%H%M}-{secrets.token_hex(3)}"


def environment_versions() -> dict[str, str | None]:
    """Versions of the software a run's results depend on."""
    from . import __version__

    def version(dist: str) -> str | None:
        try:
            return _metadata.version(dist)
        except _metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": version("torch"),
            "transformers": version("transformers"), "sparsify": __version__, "platform": platform.platform()}


def git_commit(recipe_path: str | os.PathLike | None) -> str | None:
    """``git rev-parse HEAD`` in the recipe's folder; None when not in a repository (never raises)."""
    if not recipe_path:
        return None
    try:
        folder = Path(recipe_path).expanduser().resolve().parent
        if not folder.is_dir():
            return None
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                             timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if out.returncode != 0 or not commit or any(c not in "0123456789abcdef" for c in commit):
        return None
    return commit


def _recipe_path(recipe_path) -> str | None:
    """The recipe file's resolved path; None for recipes that were not read from a file."""
    if not recipe_path:
        return None
    path = Path(recipe_path).expanduser()
    return str(path.resolve()) if path.is_file() else None


def _this_process() -> dict:
    try:
        started = psutil.Process().create_time()
    except psutil.Error:
        started = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started_at": started}


def _process_alive(pid: int, started_at: float | None) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # the same start time (to clock-tick rounding) means the same process, not a reused pid
        return started_at is None or abs(proc.create_time() - started_at) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists, but we may not inspect it: assume it is alive
        return True


def _check_status(status: str, allowed: Sequence[str], what: str) -> None:
    if status not in allowed:
        raise SparsifyError(f"unknown {what} status {status!r} (one of {', '.join(allowed)})")


def _as_float(name, value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SparsifyError(f"metric {name!r} has a value that is not a number: {value!r}") from None
    return None if math.isnan(number) else number


def _run_record(r) -> RunRecord:
    return RunRecord(
        id=r.id, recipe_name=r.recipe_name, recipe_hash=r.recipe_hash, recipe_text=r.recipe_text,
        recipe_json=r.recipe_json, overrides=_loads(r.overrides, []), model=r.model, data=r.data, seed=r.seed,
        status=r.status, reason=r.reason, started_at=_parse(r.started_at), ended_at=_parse(r.ended_at),
        versions=_loads(r.versions, {}), git_commit=r.git_commit, host=r.host, pid=r.pid,
        output_dir=r.output_dir, workdir=r.workdir, attempts=r.attempts or 1, sweep_id=r.sweep_id,
        recipe_path=r.recipe_path, kind=r.kind, sweep_point=_loads(r.sweep_point, None), schema=r.schema)


def _sweep_record(r) -> SweepRecord:
    return SweepRecord(id=r.id, name=r.name, recipe_text=r.recipe_text, recipe_path=r.recipe_path,
                       overrides=_loads(r.overrides, []), grid=_loads(r.grid, {}), points=r.points,
                       created_at=_parse(r.created_at))


def _held(claim: Claim) -> tuple:
    """The WHERE clause of a claim that is still this claimant's."""
    return (sweep_points.c.sweep_id == claim.sweep_id, sweep_points.c.idx == claim.idx,
            sweep_points.c.status == "running", sweep_points.c.token == claim.token)


def _same(column, value):
    """``column = value``, or ``column IS NULL`` for None (SQL's ``= NULL`` is never true)."""
    return column.is_(None) if value is None else column == value


def _db_seconds(conn: Connection) -> float:
    """The database's clock in seconds since the epoch: one clock for every machine sharing the registry.

    Databases without a known expression for it fall back to this machine's clock.
    """
    name = conn.dialect.name
    if name == "postgresql":
        return float(conn.exec_driver_sql("SELECT extract(epoch from clock_timestamp())").scalar())
    if name == "sqlite":
        return float(conn.exec_driver_sql("SELECT (julianday('now') - 2440587.5) * 86400.0").scalar())
    return time.time()


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _loads(text: str | None, default):
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def _str(value) -> str | None:
    return None if value is None else str(value)
