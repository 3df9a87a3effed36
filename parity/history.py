"""Run history: run records in one SQLite database, each stage's error over commits, and the first run
where a stage's error jumped.

``history(paths, db, out)`` scans folders for run records (``rmlx.parity/2``), appends the new ones to
the database (created when missing; a run already there is not added twice), and writes one
self-contained HTML page: the first jump per stage, the runs, and one log-scale chart per stage with
the commits along the x axis. CI appends by running it again with new records and the same database.

The jump rule (:func:`jumps`) runs per case: a case's error at a stage is compared with the same
case's error at that stage in the previous run with the same settings (``parity.gate.keyed``: mode,
dtype, mask policies, ...), in commit order. It jumped when it

- grew by more than ``factor`` (default 10) over ``max(previous, floor)`` (``floor`` defaults to the
  gate's 1e-5, so rounding noise near zero is no jump), or
- failed where it passed before, or
- became NaN.

Per case, because a run may hold a subset of the cases (``--case``, ``--shard``): the worst case of one
run is not like the worst case of another. The charts show each run's worst case over its cases.

Only the standard library and the core's own light modules are imported (no model, no adapter, no
MLX, torch or transformers): a core install can read a CI's history.
"""

from __future__ import annotations

import datetime as dt
import heapq
import json
import math
import re
import sqlite3
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path

from parity.atomic import write_text
from parity.gate import DEFAULT_FLOOR, RECORD_SCHEMA, keyed
from parity.metrics import fmt
from parity.stages import decode_stage
from rmlx.errors import InputError
from rmlx.files import read_json

DB_SCHEMA = "rmlx.history/1"
DEFAULT_FACTOR = 10.0
NO_COMMIT = "no commit"

_DDL = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id     TEXT PRIMARY KEY,
    commit_sha TEXT,
    dirty      INTEGER,
    committed  TEXT,
    subject    TEXT,
    created    TEXT NOT NULL,
    command    TEXT,
    settings   TEXT NOT NULL,
    passed     INTEGER NOT NULL,
    source     TEXT NOT NULL,
    ingested   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stages (
    run_id    TEXT NOT NULL REFERENCES runs(run_id),
    case_name TEXT NOT NULL,
    stage     TEXT NOT NULL,
    position  INTEGER NOT NULL,
    max_abs   REAL,
    atol      REAL,
    rtol      REAL,
    passed    INTEGER NOT NULL,
    PRIMARY KEY (run_id, case_name, stage)
);
"""


# ----------------------------------------------------------------------------------------------- reading


def _utc(text, where: str, key: str) -> str:
    """An ISO 8601 time as UTC ``YYYY-MM-DDTHH:MM:SSZ`` (sortable as text); a time without an offset is UTC."""
    if not isinstance(text, str):
        raise InputError(f"{where}: '{key}' is {text!r}, expected an ISO 8601 time")
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"{where}: '{key}' is {text!r}, expected an ISO 8601 time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(v, where: str, key: str) -> float:
    """A record number: JSON's "inf" and null (a NaN) included."""
    if isinstance(v, bool) or not (v is None or isinstance(v, (int, float)) or v in ("inf", "-inf")):
        raise InputError(f"{where}: '{key}' is {v!r}, expected a number")
    return math.nan if v is None else float(v)


def _parse(path: Path) -> dict:
    """A run record, read strictly: not JSON, or not of schema rmlx.parity/2, is an ``InputError``."""
    return read_json(path, "run record", RECORD_SCHEMA)


def _rows(path: Path, rec: dict) -> tuple[dict, list[tuple]]:
    """The ``runs`` row and the ``stages`` rows of a record; a malformed key is an ``InputError`` naming it."""
    where = f"run record {path}"

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise InputError(f"{where}: '{key}' {what}")

    need(isinstance(rec.get("run_id"), str) and bool(rec["run_id"]), "run_id", "is missing or not a string")
    need(isinstance(rec.get("settings"), dict), "settings", "is missing or not an object")
    need(isinstance(rec.get("passed"), bool), "passed", "is missing or not true/false")
    need(isinstance(rec.get("cases"), list), "cases", "is missing or not a list")
    need(rec.get("command") is None or isinstance(rec["command"], str), "command", "is not a string")
    g = rec.get("git")  # records written before provenance was recorded have none: no commit
    g = {} if g is None else g
    need(isinstance(g, dict), "git", "is not an object")
    need(g.get("commit") is None or (isinstance(g["commit"], str) and bool(g["commit"])), "git.commit",
         "is not a string")
    need(g.get("dirty") is None or isinstance(g["dirty"], bool), "git.dirty", "is not true/false")
    need(g.get("subject") is None or isinstance(g["subject"], str), "git.subject", "is not a string")
    run = {"run_id": rec["run_id"], "commit_sha": g.get("commit"),
           "dirty": None if g.get("dirty") is None else int(g["dirty"]),
           "committed": None if g.get("committed") is None else _utc(g["committed"], where, "git.committed"),
           "subject": g.get("subject"), "created": _utc(rec.get("created"), where, "created"),
           "command": rec.get("command"), "settings": json.dumps(rec["settings"], sort_keys=True),
           "passed": int(rec["passed"]), "source": str(path)}
    rows: list[tuple] = []
    cases: set[str] = set()
    for ci, c in enumerate(rec["cases"]):
        ck = f"cases[{ci}]"
        need(isinstance(c, dict) and isinstance(c.get("name"), str), f"{ck}.name", "is missing or not a string")
        need(c["name"] not in cases, f"{ck}.name", f"repeats case {c['name']!r}")
        cases.add(c["name"])
        need(isinstance(c.get("stages"), list), f"{ck}.stages", "is missing or not a list")
        need(isinstance(c.get("decode", []), list), f"{ck}.decode", "is not a list")
        seen: set[str] = set()
        entries = []
        for si, s in enumerate(c["stages"]):
            sk = f"{ck}.stages[{si}]"
            need(isinstance(s, dict) and isinstance(s.get("name"), str), f"{sk}.name", "is missing or not a string")
            need(isinstance(s.get("passed"), bool), f"{sk}.passed", "is missing or not true/false")
            tol = s.get("tolerance")
            need(isinstance(tol, dict), f"{sk}.tolerance", "is missing or not an object")
            entries.append((s["name"], _number(s.get("max_abs"), where, f"{sk}.max_abs"),
                            _number(tol.get("atol"), where, f"{sk}.tolerance.atol"),
                            _number(tol.get("rtol"), where, f"{sk}.tolerance.rtol"), s["passed"], sk))
        for di, d in enumerate(c.get("decode", [])):
            dk = f"{ck}.decode[{di}]"
            need(isinstance(d, dict) and isinstance(d.get("step"), int) and not isinstance(d["step"], bool),
                 f"{dk}.step", "is missing or not an integer")
            need(isinstance(d.get("passed"), bool), f"{dk}.passed", "is missing or not true/false")
            # a decode step's tolerance is not in the record: none is stored
            entries.append((decode_stage(d["step"]), _number(d.get("max_abs"), where, f"{dk}.max_abs"),
                            math.nan, math.nan, d["passed"], dk))
        for pos, (name, max_abs, atol, rtol, passed, key) in enumerate(entries):
            need(name not in seen, key, f"repeats stage {name!r} in case {c['name']!r}")
            seen.add(name)
            rows.append((run["run_id"], c["name"], name, pos, _sql(max_abs), _sql(atol), _sql(rtol), int(passed)))
    return run, rows


def _sql(v: float) -> float | None:
    return None if math.isnan(v) else v


def _claims_record(path: Path) -> bool:
    """Is a ``*.json`` file found by a scan a run record? Other JSON (self-test summaries, baselines, a
    gate's output) is not; a file that names the record schema but is not valid JSON is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        if f'"{RECORD_SCHEMA}"' in text:
            raise InputError(f"run record {path}: not readable JSON ({type(e).__name__}: {e})") from None
        return False
    return isinstance(data, dict) and data.get("schema") == RECORD_SCHEMA


def scan(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(run records, other JSON files skipped). A folder is searched recursively for ``*.json``; a file
    named directly must be a run record (checked by :func:`ingest`)."""
    records: list[Path] = []
    skipped: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*.json") if q.is_file()):
                if f.resolve() in seen:
                    continue
                seen.add(f.resolve())
                (records if _claims_record(f) else skipped).append(f)
        elif p.is_file():
            if p.resolve() not in seen:
                seen.add(p.resolve())
                records.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return records, skipped


# ---------------------------------------------------------------------------------------------- database


def _connect(db_path: Path, create: bool) -> sqlite3.Connection:
    """The history database (created when ``create``); a file that is not one is an ``InputError``."""
    db_path = Path(db_path)
    if db_path.exists() and not db_path.is_file():
        raise InputError(f"history database {db_path}: not a file")
    if not db_path.exists():
        if not create:
            raise InputError(f"history database {db_path}: not found")
        db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(db_path), timeout=60, isolation_level=None)  # transactions are explicit
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and create:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in filter(str.strip, _DDL.split(";")):
                    conn.execute(stmt)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (DB_SCHEMA,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            tables = {"meta", "runs", "stages"}
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() if "meta" in tables else None
        if row is None or row[0] != DB_SCHEMA or not {"runs", "stages"} <= tables:
            raise InputError(f"history database {db_path}: schema is {row and row[0]!r}, expected {DB_SCHEMA!r}")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise InputError(f"history database {db_path}: not an SQLite database ({e})") from None
    except BaseException:
        conn.close()
        raise
    return conn


def ingest(db_path: Path, record_paths: Iterable[Path]) -> dict:
    """Append run records to the database at ``db_path`` (created when missing). Every record is read
    and checked before the database is touched; all new runs are then added in one transaction. A run
    whose ``run_id`` is already there is not added again. Returns ``{"ingested": [run ids],
    "already": [run ids], "runs": runs in the database}``."""
    parsed = []
    for p in map(Path, record_paths):
        parsed.append(_rows(p, _parse(p)))
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    conn = _connect(db_path, create=True)
    ingested, already = [], []
    try:
        conn.execute("BEGIN IMMEDIATE")  # one writer at a time: CI jobs may append concurrently
        try:
            for run, rows in parsed:
                if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run["run_id"],)).fetchone():
                    already.append(run["run_id"])
                    continue
                conn.execute("INSERT INTO runs (run_id, commit_sha, dirty, committed, subject, created, command, "
                             "settings, passed, source, ingested) VALUES (:run_id, :commit_sha, :dirty, :committed, "
                             ":subject, :created, :command, :settings, :passed, :source, :ingested)",
                             {**run, "ingested": now})
                conn.executemany("INSERT INTO stages (run_id, case_name, stage, position, max_abs, atol, rtol, "
                                 "passed) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                ingested.append(run["run_id"])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        total = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    finally:
        conn.close()
    return {"ingested": ingested, "already": already, "runs": total}


def like(settings: dict) -> str:
    """The settings that make two runs comparable (``parity.gate.keyed``), as a canonical JSON text."""
    return json.dumps({k: settings.get(k) for k in keyed()}, sort_keys=True)


def short(commit: str | None) -> str:
    return NO_COMMIT if commit is None else commit[:7]


def _forward_order(sequences: Iterable[Sequence[str]]) -> list[str]:
    """Stage names in forward order, merged from the records' own orders (each case lists its stages in
    forward order): a topological order of "a came before b", ties by first appearance."""
    first: dict[str, int] = {}
    after: dict[str, set[str]] = {}
    indegree: dict[str, int] = {}
    for seq in sequences:
        for s in seq:
            if s not in first:
                first[s], after[s], indegree[s] = len(first), set(), 0
        for a, b in zip(seq, seq[1:], strict=False):
            if b not in after[a]:
                after[a].add(b)
                indegree[b] += 1
    ready = [(first[s], s) for s, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        _, s = heapq.heappop(ready)
        out.append(s)
        for t in after[s]:
            indegree[t] -= 1
            if indegree[t] == 0:
                heapq.heappush(ready, (first[t], t))
    placed = set(out)
    return out + sorted((s for s in first if s not in placed), key=first.__getitem__)  # a cycle: as first seen


def _read(db_path: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """(runs in order, {stage: points}) of the database."""
    conn = _connect(db_path, create=False)
    try:
        conn.row_factory = sqlite3.Row
        runs = [dict(r) for r in conn.execute("SELECT * FROM runs")]
        rows = conn.execute("SELECT run_id, case_name, stage, position, max_abs, atol, rtol, passed FROM stages "
                            "ORDER BY run_id, case_name, position").fetchall()
    finally:
        conn.close()
    # commit time, then the time the run was recorded; a run without a commit sits at its own time
    runs.sort(key=lambda r: (r["committed"] or r["created"], r["created"], r["run_id"]))
    for i, r in enumerate(runs):
        settings = json.loads(r["settings"])
        commit = r.pop("commit_sha")
        r.update(index=i, commit=commit, short=short(commit), settings=settings, like=like(settings),
                 inject=list(settings.get("inject") or []), dirty=None if r["dirty"] is None else bool(r["dirty"]),
                 passed=bool(r["passed"]))
    by_id = {r["run_id"]: r for r in runs}
    sequences: dict[tuple[str, str], list[str]] = {}
    cells: dict[str, dict[str, dict[str, dict]]] = {}  # stage -> run id -> case -> values
    for row in rows:
        sequences.setdefault((row["run_id"], row["case_name"]), []).append(row["stage"])
        cells.setdefault(row["stage"], {}).setdefault(row["run_id"], {})[row["case_name"]] = {
            "max_abs": math.nan if row["max_abs"] is None else row["max_abs"],
            "atol": math.nan if row["atol"] is None else row["atol"],
            "rtol": math.nan if row["rtol"] is None else row["rtol"], "passed": bool(row["passed"])}
    series: dict[str, list[dict]] = {}
    for stage in _forward_order(sequences.values()):
        points = []
        for run_id, cases in cells[stage].items():
            run = by_id[run_id]
            worst = max(sorted(cases), key=lambda c: _severity(cases[c]["max_abs"]))
            w = cases[worst]
            points.append({**{k: run[k] for k in ("index", "run_id", "commit", "short", "dirty", "committed",
                                                   "subject", "created", "settings", "like", "inject")},
                           "case": worst, "max_abs": w["max_abs"], "atol": w["atol"], "rtol": w["rtol"],
                           "passed": all(v["passed"] for v in cases.values()), "cases": cases})
        points.sort(key=lambda p: p["index"])
        series[stage] = points
    return runs, series


def _severity(v: float) -> float:
    return math.inf if math.isnan(v) else v


def load(db_path: Path) -> dict[str, list[dict]]:
    """Per-stage error series, stages in forward order: ``{stage: [point, ...]}``, one point per run that
    has the stage, ordered by commit time, then by the time the run was recorded.

    A point holds the run (``index`` in that order, ``run_id``, ``commit`` (None: no commit), ``short``,
    ``dirty``, ``committed``, ``subject``, ``created``, ``settings``, ``like``, ``inject``), the run's
    worst case (``case``, ``max_abs``, ``atol``, ``rtol``; NaN: none), ``passed`` (every case) and
    ``cases``: ``{case: {"max_abs", "atol", "rtol", "passed"}}``."""
    return _read(db_path)[1]


# ------------------------------------------------------------------------------------------------- jumps


def jumps(series: dict[str, list[dict]], factor: float = DEFAULT_FACTOR, floor: float = DEFAULT_FLOOR
          ) -> list[dict]:
    """Every jump of every stage and case, in run order, then forward order, then by case. A case's error
    at a stage jumped when, against the same case and stage in the previous run with the same settings
    (:func:`like`), it grew past ``factor * max(before, floor)``, failed where it passed, or became NaN."""
    if not (math.isfinite(factor) and factor >= 1 and math.isfinite(floor) and floor >= 0):
        raise InputError(f"jump factor must be finite and >= 1 and floor finite and >= 0; got {factor}, {floor}")
    found = []
    for order, (stage, points) in enumerate(series.items()):
        last: dict[tuple[str, str], tuple[dict, dict]] = {}
        for p in points:
            for case in sorted(p["cases"]):
                now = p["cases"][case]
                key = (case, p["like"])
                if key in last:
                    prev_point, prev = last[key]
                    a, b = prev["max_abs"], now["max_abs"]
                    why = []
                    if math.isnan(b) and not math.isnan(a):
                        why.append("NaN")
                    elif not math.isnan(a) and b > factor * max(a, floor):
                        why.append(f"x{fmt(b / a, '.3g')}" if a > 0 else "from 0")
                    if prev["passed"] and not now["passed"]:
                        why.append("pass -> fail")
                    if why:
                        found.append({
                            "stage": stage, "order": order, "case": case, "index": p["index"],
                            "run_id": p["run_id"], "commit": p["commit"], "short": p["short"], "dirty": p["dirty"],
                            "subject": p["subject"], "like": p["like"], "inject": p["inject"],
                            "before": a, "after": b, "before_passed": prev["passed"], "after_passed": now["passed"],
                            "before_run_id": prev_point["run_id"], "before_commit": prev_point["commit"],
                            "why": ", ".join(why)})
                last[key] = (p, now)
    found.sort(key=lambda j: (j["index"], j["order"], j["case"]))
    return found


def first_jumps(found: list[dict]) -> list[dict]:
    """The first jump of each stage (the earliest run; in one run, the first case), earliest first."""
    out: dict[str, dict] = {}
    for j in found:  # already in run order
        out.setdefault(j["stage"], j)
    return sorted(out.values(), key=lambda j: (j["index"], j["order"]))


def onsets(found: list[dict]) -> list[dict]:
    """Per run with a jump, the first stage (in forward order) that jumped there, and how many stages
    jumped there in all: ``[{"jump": first jump, "stages": count}]`` in run order. A defect introduced
    by a commit shows as one onset at that commit, at the stage where its error starts."""
    out: dict[int, dict] = {}
    for j in sorted(found, key=lambda j: (j["index"], j["order"], j["case"])):
        entry = out.setdefault(j["index"], {"jump": j, "stages": set()})
        entry["stages"].add(j["stage"])
    return [{"jump": e["jump"], "stages": len(e["stages"])} for e in out.values()]


# -------------------------------------------------------------------------------------------------- HTML

_PASS, _FAIL, _MUTED, _INK, _GRID = "#1a7f37", "#cf222e", "#8c959f", "#1f2328", "#d8dee4"
_GROUP_COLOURS = ("#0969da", "#8250df", "#bc4c00", "#1b7c83", "#bf3989", "#57606a", "#4d2d00", "#116329")

_CSS = """
:root { --pass: #1a7f37; --fail: #cf222e; --muted: #656d76; --ink: #1f2328; --line: #d8dee4; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--ink);
       margin: 24px auto; max-width: 1000px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
h3 { font-size: 14px; margin: 18px 0 2px; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.muted { color: var(--muted); }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); vertical-align: top;
         white-space: nowrap; }
td.wrap { white-space: normal; min-width: 12em; }
th { color: var(--muted); font-weight: 600; }
td.mono, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.subject { display: inline-block; vertical-align: bottom; max-width: 16em; overflow: hidden;
           text-overflow: ellipsis; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.fail td.st { color: var(--fail); font-weight: 700; }
.jump { color: var(--fail); font-weight: 600; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 16px; color: var(--muted); font-size: 12.5px; margin: 6px 0; }
.legend span { display: inline-flex; align-items: center; gap: 5px; }
section.stage svg { width: 100%; height: auto; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
"""


def _e(x) -> str:
    return escape(str(x), quote=True)


def _slug(name: str) -> str:
    return "stage-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def _labels(runs: list[dict]) -> dict[str, str]:
    """A short label per settings group: the keys in which the groups differ ("" for a single group)."""
    groups = {r["like"]: r["settings"] for r in runs}
    varying = [k for k in keyed() if len({json.dumps(s.get(k)) for s in groups.values()}) > 1]
    return {g: " ".join(f"{k}={s.get(k)}" for k in varying) for g, s in groups.items()}


def _commit_cell(r: dict) -> str:
    sha = f'<span class="mono">{_e(r["short"])}</span>' + (" (dirty)" if r.get("dirty") else "")
    subject = r.get("subject")
    return sha + (f' <span class="subject muted" title="{_e(subject)}">{_e(subject)}</span>' if subject else "")


def _settings_cell(label: str, inject: list[str]) -> str:
    return "; ".join([_e(label)] * bool(label) + [f"injected {_e(', '.join(inject))}"] * bool(inject))


def _chart(stage: str, points: list[dict], runs: list[dict], colours: dict[str, str], labels: dict[str, str],
           marks: set[int]) -> str:
    """Inline SVG: the stage's error (each run's worst case) per run, log scale, with each settings group's
    atol as a dashed line, failing runs red, jumps ringed, commits along the x axis."""
    width, left, right, top = 920, 58, 14, 10
    n = max(len(runs), 1)
    step = (width - left - right) / n

    def finite_pos(v: float) -> bool:
        return math.isfinite(v) and v > 0

    values = [p["max_abs"] for p in points if finite_pos(p["max_abs"])]
    values += [p["atol"] for p in points if finite_pos(p["atol"])]
    lo, hi = (math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))) if values else (0, 0)
    hi = max(hi, lo + 1)
    band = min(120, max(66, 22 * (hi - lo))) if values else 0  # no error and no atol above 0: only the 0 row
    has_bad = any(not math.isfinite(p["max_abs"]) for p in points)
    has_zero = any(p["max_abs"] == 0 for p in points)
    y_top = top + (18 if has_bad else 0)
    y_bottom = y_top + band
    y_zero = y_bottom + (16 if values else 6) if has_zero else None
    axis = (y_zero or y_bottom) + 8
    height = axis + 62

    def x(i: int) -> float:
        return left + (i + 0.5) * step

    def y(v: float) -> float:
        if not math.isfinite(v):
            return top + 6
        if v <= 0:
            return y_zero if y_zero is not None else y_bottom
        return y_bottom - (math.log10(v) - lo) / (hi - lo) * band

    out = [f'<svg viewBox="0 0 {width} {height:.0f}" role="img" aria-label="{_e(stage)} error per run">']
    every = 1 if hi - lo <= 6 else 2
    for k in range(lo, hi + 1) if values else ():
        yy = y(10.0 ** k)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="{_GRID}"/>')
        if (k - lo) % every == 0:
            out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" font-size="11" text-anchor="end" '
                       f'fill="{_MUTED}">1e{k}</text>')
    if y_zero is not None:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y_zero:.1f}" y2="{y_zero:.1f}" stroke="{_GRID}" '
                   'stroke-dasharray="2 3"/>')
        out.append(f'<text x="{left - 6}" y="{y_zero + 4:.1f}" font-size="11" text-anchor="end" '
                   f'fill="{_MUTED}">0</text>')
    if has_bad:
        out.append(f'<text x="{left - 6}" y="{top + 10:.1f}" font-size="11" text-anchor="end" '
                   f'fill="{_FAIL}">inf/NaN</text>')
    # commit boundaries and labels along the x axis
    last_label = -1e9
    for i, r in enumerate(runs):
        new_commit = i == 0 or r["commit"] != runs[i - 1]["commit"]
        if new_commit and i:
            xx = left + i * step
            out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top}" y2="{axis:.1f}" stroke="{_GRID}" '
                       'stroke-width="0.7"/>')
        if new_commit and x(i) - last_label >= 13:
            last_label = x(i)
            label = r["short"] + ("*" if r.get("dirty") else "")
            out.append(f'<text transform="translate({x(i):.1f},{axis + 10:.1f}) rotate(-40)" font-size="10.5" '
                       f'text-anchor="end" font-family="ui-monospace, monospace" fill="{_INK}">'
                       f'<title>{_e(r["short"])} {_e(r["subject"] or "")}</title>{_e(label)}</text>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{axis:.1f}" y2="{axis:.1f}" stroke="{_MUTED}"/>')
    # per settings group: the atol as a dashed line, the error as a solid one
    for g, colour in colours.items():
        pts = [p for p in points if p["like"] == g]
        tol = [f"{x(p['index']):.1f},{y(p['atol']):.1f}" for p in pts if finite_pos(p["atol"])]
        if tol:
            if len(tol) == 1:
                xx, yy = tol[0].split(",")
                tol = [f"{float(xx) - step / 2:.1f},{yy}", f"{float(xx) + step / 2:.1f},{yy}"]
            out.append(f'<polyline points="{" ".join(tol)}" fill="none" stroke="{colour}" stroke-width="1.2" '
                       f'stroke-dasharray="5 4" opacity="0.7"><title>atol {_e(labels[g])}</title></polyline>')
        err = [f"{x(p['index']):.1f},{y(p['max_abs']):.1f}" for p in pts]
        if len(err) > 1:
            out.append(f'<polyline points="{" ".join(err)}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
    for p in points:
        xx, yy = x(p["index"]), y(p["max_abs"])
        tip = (f"{p['short']} {p['subject'] or ''}\nrun {p['run_id']}\n{p['case']}: max_abs {fmt(p['max_abs'])}"
               f" (atol {fmt(p['atol'])}) {'pass' if p['passed'] else 'FAIL'}"
               + (f"\n{labels[p['like']]}" if labels[p["like"]] else "")
               + (f"\ninjected {', '.join(p['inject'])}" if p["inject"] else ""))
        if p["index"] in marks:
            out.append(f'<circle cx="{xx:.1f}" cy="{yy:.1f}" r="7.5" fill="none" stroke="{_FAIL}" stroke-width="2"/>')
        out.append(f'<circle cx="{xx:.1f}" cy="{yy:.1f}" r="3.6" fill="{_PASS if p["passed"] else _FAIL}" '
                   f'stroke="#fff" stroke-width="0.8"><title>{_e(tip)}</title></circle>')
    out.append("</svg>")
    return "".join(out)


def to_html(runs: list[dict], series: dict[str, list[dict]], found: list[dict], factor: float, floor: float,
            source: str = "") -> str:
    """The history page: first jump per stage, the runs, one chart per stage. Every string is escaped."""
    labels = _labels(runs)
    colours = {g: _GROUP_COLOURS[i % len(_GROUP_COLOURS)] for i, g in enumerate(dict.fromkeys(r["like"] for r in runs))}
    firsts = first_jumps(found)
    commits = len({r["commit"] or r["run_id"] for r in runs})
    parts = [f"<h1>rmlx parity history</h1><p class='muted'>{len(runs)} runs of {commits} commits, "
             f"{len(series)} stages{', from ' + _e(source) if source else ''}. A jump: a case's error at a stage "
             f"grew past {factor:g} &times; max(previous, {floor:g}), failed where it passed, or became NaN, "
             "against the previous run with the same settings.</p>"]
    for o in onsets(found):
        j = o["jump"]
        more = f", then {o['stages'] - 1} more stages" if o["stages"] > 1 else ""
        parts.append(f"<p><b>At {_commit_cell(j).replace('subject muted', 'muted')}:</b> first jump at "
                     f"<a class='mono' href='#{_slug(j['stage'])}'>{_e(j['stage'])}</a> ({_e(j['case'])}, "
                     f"{_e(fmt(j['before']))} &rarr; <span class='jump'>{_e(fmt(j['after']))}</span>, {_e(j['why'])})"
                     f"{more}.</p>")
    parts.append(f"<h2>First jump per stage ({len(firsts)})</h2>")
    if firsts:
        rows = "".join(
            f"<tr><td class='mono'><a href='#{_slug(j['stage'])}'>{_e(j['stage'])}</a></td>"
            f"<td>{_commit_cell(j)}</td><td class='num'>{_e(fmt(j['before']))} &rarr; "
            f"<span class='jump'>{_e(fmt(j['after']))}</span></td><td>{_e(j['why'])}</td>"
            f"<td class='mono'>{_e(j['case'])}</td>"
            f"<td class='wrap'>{_settings_cell(labels[j['like']], j['inject'])}</td></tr>" for j in firsts)
        parts.append("<table><thead><tr><th>stage</th><th>commit</th><th>before &rarr; after</th><th>why</th>"
                     f"<th>case</th><th>settings</th></tr></thead><tbody>{rows}</tbody></table>")
    else:
        parts.append("<p>No stage's error jumped.</p>")
    parts.append(f"<h2>Runs ({len(runs)})</h2>")
    rows = "".join(
        f"<tr class='{'pass' if r['passed'] else 'fail'}'><td class='num' title='run {_e(r['run_id'])}'>"
        f"{r['index'] + 1}</td>"
        f"<td>{_commit_cell(r)}</td><td class='mono'>{_e(r['committed'] or '')}</td>"
        f"<td class='mono'>{_e(r['created'])}</td>"
        f"<td class='wrap'><span style='color:{colours[r['like']]}'>&#9632;</span> "
        f"{_settings_cell(labels[r['like']], r['inject'])}</td>"
        f"<td class='st'>{'PASS' if r['passed'] else 'FAIL'}</td></tr>" for r in runs)
    parts.append("<table><thead><tr><th>#</th><th>commit</th><th>committed</th><th>recorded</th>"
                 f"<th>settings</th><th>verdict</th></tr></thead><tbody>{rows}</tbody></table>")
    parts.append("<h2>Error per stage</h2>")
    legend = [f"<span><svg width='12' height='12'><circle cx='6' cy='6' r='4' fill='{_PASS}'/></svg>passes</span>",
              f"<span><svg width='12' height='12'><circle cx='6' cy='6' r='4' fill='{_FAIL}'/></svg>fails</span>",
              f"<span><svg width='18' height='18'><circle cx='9' cy='9' r='7' fill='none' stroke='{_FAIL}' "
              "stroke-width='2'/></svg>jump</span>",
              f"<span><svg width='24' height='8'><line x1='0' x2='24' y1='4' y2='4' stroke='{_MUTED}' "
              "stroke-dasharray='5 4'/></svg>atol</span>",
              "<span>max_abs of each run's worst case, log scale; * marks a commit with uncommitted changes</span>"]
    if len(colours) > 1:
        legend += [f"<span><svg width='24' height='8'><line x1='0' x2='24' y1='4' y2='4' stroke='{c}' "
                   f"stroke-width='2'/></svg>{_e(labels[g])}</span>" for g, c in colours.items()]
    parts.append(f"<div class='legend'>{''.join(legend)}</div>")
    marks: dict[str, set[int]] = {}
    for j in found:
        marks.setdefault(j["stage"], set()).add(j["index"])
    for stage, points in series.items():
        jumped = " <span class='jump'>jump</span>" if stage in marks else ""
        parts.append(f"<section class='stage' id='{_slug(stage)}'><h3>{_e(stage)}{jumped}</h3>"
                     f"{_chart(stage, points, runs, colours, labels, marks.get(stage, set()))}</section>")
    parts.append("<footer>Written by rmlx-parity history from the run records' JSON; self-contained.</footer>")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>rmlx parity history</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def write_html(db_path: Path, out_html: Path, factor: float = DEFAULT_FACTOR, floor: float = DEFAULT_FLOOR
               ) -> list[dict]:
    """Write the history page of the database to ``out_html`` (atomically). Returns every jump."""
    runs, series = _read(db_path)
    found = jumps(series, factor, floor)
    write_text(Path(out_html), to_html(runs, series, found, factor, floor, str(db_path)))
    return found


# --------------------------------------------------------------------------------------------- the command


def _jsonable(v: float):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else "inf"
    return v


def history(paths: list[Path], db: Path, out: Path, factor: float = DEFAULT_FACTOR,
            floor: float = DEFAULT_FLOOR) -> dict:
    """Scan ``paths`` for run records, append the new ones to ``db``, write the page ``out``. Returns a
    summary: the records found, JSON files skipped, runs ingested and already present, runs and commits
    in the database, stages, and the first jump per stage (JSON-ready)."""
    records, skipped = scan(paths)
    added = ingest(db, records)
    found = write_html(db, out, factor, floor)
    runs, series = _read(db)
    def public(j: dict) -> dict:
        return {"stage": j["stage"], "case": j["case"], "run_id": j["run_id"], "commit": j["commit"],
                "short": j["short"], "dirty": j["dirty"], "subject": j["subject"], "before": _jsonable(j["before"]),
                "after": _jsonable(j["after"]), "why": j["why"], "before_run_id": j["before_run_id"],
                "before_commit": j["before_commit"]}

    return {"db": str(db), "out": str(out), "records": len(records), "skipped": [str(p) for p in skipped],
            "ingested": len(added["ingested"]), "already": len(added["already"]), "runs": added["runs"],
            "commits": len({r["commit"] or r["run_id"] for r in runs}), "stages": len(series),
            "factor": factor, "floor": floor, "jumps": [public(j) for j in first_jumps(found)],
            "onsets": [{"jump": public(o["jump"]), "stages": o["stages"]} for o in onsets(found)]}


def summary(result: dict) -> str:
    """The lines the command prints."""
    lines = [f"history: {result['ingested']} runs added ({result['already']} already there) from "
             f"{result['records']} records; {result['runs']} runs of {result['commits']} commits, "
             f"{result['stages']} stages in {result['db']}"]
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])} JSON files that are not run records")
    for o in result["onsets"]:
        j = o["jump"]
        lines.append(f"jump at {j['short']}{' (dirty)' if j['dirty'] else ''} {(j['subject'] or '')[:60]!r}: "
                     f"first {j['stage']} in {j['case']}, {fmt(j['before'])} -> {fmt(j['after'])} ({j['why']})"
                     + (f", then {o['stages'] - 1} more stages" if o["stages"] > 1 else ""))
    n = len(result["jumps"])
    lines.append(f"{n} stages jumped; the page lists the first jump of each: {result['out']}" if n
                 else f"no stage's error jumped; page: {result['out']}")
    return "\n".join(lines)
