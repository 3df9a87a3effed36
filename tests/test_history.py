"""Run history (parity/history.py) on real records of the real harness: a planted defect recorded under a
later commit is found as a jump at the defect's stage and that commit, only like settings are compared,
re-ingesting adds nothing, bad records are bad input naming the file, and the page is self-contained.

Three real runs of tiny/text-4 (clean; ``mlp-gelu-exact`` planted; planted under the other mask policy).
Their copies are placed at made-up commits by rewriting the records' ``git`` field (and ``run_id``,
which a second run would have had): that is the only edit."""

from __future__ import annotations

import copy
import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from parity import history
from parity.adapters.gemma4_unified.defects import CATALOG
from parity.cli import main
from rmlx.errors import InputError
from tests.conftest import FIXTURES, ROOT

pytestmark = pytest.mark.xdist_group("test_history")  # the three runs once, on one worker
TINY = FIXTURES / "models" / "tiny"
DEFECT = "mlp-gelu-exact"
C1, C2, C3, C4, C5 = (hashlib.sha1(f"commit {n}".encode()).hexdigest() for n in range(1, 6))


def _run(out: Path, *extra: str) -> dict:
    code = main(["run", "--model", str(TINY), "--case", "text-4", "--no-oracle", *extra,
                 "--report-dir", str(out / "rep"), "--json", str(out / "record.json")])
    assert code in (0, 1), code
    return json.loads((out / "record.json").read_text())


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    d = tmp_path_factory.mktemp("history-runs")
    return {"clean": _run(d / "clean"), "bad": _run(d / "bad", "--inject", DEFECT),
            "bad-hf": _run(d / "bad-hf", "--inject", DEFECT, "--mask-policy", "hf-forward")}


def at(rec: dict, commit: str | None, day: int, tag: str) -> dict:
    """``rec`` as if recorded at ``commit`` (committed on 2026-01-``day``) under its own run id."""
    rec = copy.deepcopy(rec)
    rec["run_id"] = f"{rec['run_id']}-{tag}"
    rec["git"] = ({"commit": None, "dirty": None, "committed": None, "subject": None} if commit is None else
                  {"commit": commit, "dirty": False, "committed": f"2026-01-{day:02d}T12:00:00+02:00",
                   "subject": f"commit {tag}"})
    return rec


@pytest.fixture(scope="module")
def timeline(records, tmp_path_factory):
    """A CI's reports folder: c1 clean; c2 the defect under hf-forward (no earlier hf-forward run);
    c3 the defect under the official policy (the jump); c4 fixed; c5 hf-forward again; then a run of
    code outside git. Plus JSON that is not a run record (a baseline, a self-test summary)."""
    d = tmp_path_factory.mktemp("history-reports")
    recs = {"c1": at(records["clean"], C1, 1, "c1"), "c2": at(records["bad-hf"], C2, 2, "c2"),
            "c3": at(records["bad"], C3, 3, "c3"), "c4": at(records["clean"], C4, 4, "c4"),
            "c5": at(records["bad-hf"], C5, 5, "c5"), "nogit": at(records["clean"], None, 6, "nogit")}
    for name, rec in recs.items():
        (d / name).mkdir()
        (d / name / "report.json").write_text(json.dumps(rec))
    (d / "baselines").mkdir()
    (d / "baselines" / "float32-free.json").write_text((FIXTURES / "baselines" / "float32-free.json").read_text())
    (d / "c3" / "selftest.json").write_text(json.dumps({"schema": "rmlx.selftest/1", "defects": []}))
    return d, recs


def stage_value(rec: dict, stage: str) -> float:
    return next(s["max_abs"] for s in rec["cases"][0]["stages"] if s["name"] == stage)


def test_a_planted_defect_is_a_jump_at_its_stage_and_commit(timeline, tmp_path):
    reports, recs = timeline
    result = history.history([reports], tmp_path / "h.sqlite", tmp_path / "h.html")
    assert (result["records"], result["ingested"], result["runs"], result["commits"]) == (6, 6, 6, 6)
    assert sorted(Path(p).name for p in result["skipped"]) == ["float32-free.json", "selftest.json"]

    stage = CATALOG[DEFECT].stage
    assert stage == "layers.0.mlp.out"
    onset = result["onsets"]
    assert len(onset) == 1 and onset[0]["jump"]["stage"] == stage and onset[0]["jump"]["commit"] == C3, onset
    firsts = {j["stage"]: j for j in result["jumps"]}
    j = firsts[stage]
    assert (j["commit"], j["before_commit"], j["case"]) == (C3, C1, "tiny/text-4")  # not C2: other settings
    assert j["before"] == stage_value(recs["c1"], stage) and j["after"] == stage_value(recs["c3"], stage)
    assert j["after"] > 10 * j["before"]
    assert {j["commit"] for j in result["jumps"]} == {C3}  # fixing it (c4) and c5 (like c2) are no jumps

    series = history.load(tmp_path / "h.sqlite")
    order = list(series)
    assert order[:2] == ["text.embed_tokens", "text.inputs_embeds"] and order[-1] == "logits@decode.4"
    assert order.index("layers.0.attn.out") < order.index(stage) < order.index("layers.3.out")
    assert not {s for s in firsts if order.index(s) < order.index(stage)}  # nothing upstream of the defect
    assert [p["commit"] for p in series[stage]] == [C1, C2, C3, C4, C5, None]  # commit time, then no commit
    assert [p["passed"] for p in series["layers.3.out"]] == [True, False, False, True, False, True]
    # pass -> fail is named where the defect's error crosses the tolerance
    assert "pass -> fail" in firsts[recs["c3"]["first_divergence"]["stage"]]["why"]

    printed = history.summary(result)
    assert f"jump at {C3[:7]} 'commit c3': first {stage} in tiny/text-4" in printed


def test_reingesting_adds_nothing_and_new_records_append(timeline, tmp_path):
    reports, recs = timeline
    db, out = tmp_path / "h.sqlite", tmp_path / "h.html"
    first = history.history([reports / "c1", reports / "c2"], db, out)
    assert (first["ingested"], first["runs"], first["jumps"]) == (2, 2, [])

    def counts():
        with sqlite3.connect(db) as conn:
            return [conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("runs", "stages")]

    before = counts()
    again = history.history([reports / "c1" / "report.json", reports / "c2"], db, out)
    assert (again["ingested"], again["already"], again["runs"]) == (0, 2, 2) and counts() == before
    later = history.history([reports], db, out)  # CI appends: the same database, more records
    assert (later["ingested"], later["already"], later["runs"]) == (4, 2, 6)
    assert counts()[1] == 6 * sum(len(c["stages"]) + len(c["decode"]) for c in recs["c1"]["cases"])
    assert later["onsets"][0]["jump"]["commit"] == C3


def test_the_page_is_self_contained_and_names_stage_and_commit(timeline, tmp_path):
    reports, _ = timeline
    history.history([reports], tmp_path / "h.sqlite", tmp_path / "out" / "history.html")
    page = (tmp_path / "out" / "history.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "layers.0.mlp.out" in page and C3[:7] in page and "commit c3" in page and history.NO_COMMIT in page
    assert "<script" not in page and "http://" not in page and "https://" not in page and "src=" not in page
    assert page.count("<section class='stage'") == len(history.load(tmp_path / "h.sqlite"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["history.html"]  # no temporary sibling left


@pytest.mark.parametrize("damage, message", [
    (lambda r: r.pop("cases"), "'cases' is missing"),
    (lambda r: r["cases"][0]["stages"][3].update(max_abs="big"), "'cases[0].stages[3].max_abs' is 'big'"),
    (lambda r: r["git"].update(committed="yesterday"), "'git.committed' is 'yesterday'"),
    (lambda r: r["cases"][0]["stages"].append(r["cases"][0]["stages"][0]), "repeats stage 'text.embed_tokens'"),
])
def test_a_malformed_record_is_bad_input_naming_the_file(records, tmp_path, damage, message):
    db = tmp_path / "h.sqlite"
    good = tmp_path / "reports" / "good.json"
    good.parent.mkdir()
    good.write_text(json.dumps(at(records["clean"], C1, 1, "good")))
    history.ingest(db, [good])
    rec = at(records["clean"], C2, 2, "bad")
    damage(rec)
    bad = tmp_path / "reports" / "bad.json"
    bad.write_text(json.dumps(rec))
    with pytest.raises(InputError, match="bad.json") as e:
        history.history([tmp_path / "reports"], db, tmp_path / "h.html")
    assert message in str(e.value)
    assert history.ingest(db, [good])["runs"] == 1  # nothing of the batch was added
    assert not (tmp_path / "h.html").exists()


def test_not_json_or_another_schema_is_bad_input(records, tmp_path):
    text = json.dumps(records["clean"])
    truncated = tmp_path / "scan" / "report.json"
    truncated.parent.mkdir()
    truncated.write_text(text[: len(text) // 2])  # claims the schema, is not JSON
    with pytest.raises(InputError, match=r"report\.json: not readable JSON"):
        history.history([tmp_path / "scan"], tmp_path / "h.sqlite", tmp_path / "h.html")
    with pytest.raises(InputError, match=r"report\.json: not readable JSON"):
        history.ingest(tmp_path / "h.sqlite", [truncated])
    other = tmp_path / "float32-free.json"
    other.write_text((FIXTURES / "baselines" / "float32-free.json").read_text())
    with pytest.raises(InputError, match=r"float32-free\.json: schema is 'rmlx.baseline/1', expected 'rmlx.parity/2'"):
        history.history([other], tmp_path / "h.sqlite", tmp_path / "h.html")  # named directly: must be a record
    with pytest.raises(InputError, match="no such file or folder"):
        history.history([tmp_path / "missing"], tmp_path / "h.sqlite", tmp_path / "h.html")
    not_db = tmp_path / "not.sqlite"
    not_db.write_text("hello " * 100)
    with pytest.raises(InputError, match=r"not\.sqlite: not an SQLite database"):
        history.load(not_db)
    with pytest.raises(InputError, match="not found"):
        history.load(tmp_path / "absent.sqlite")


def test_the_jump_rule():
    """Growth past factor x max(before, floor), pass -> fail, and NaN are jumps; other settings, noise
    near zero and a fall are not."""
    def point(i, like, **cases):
        return {"index": i, "run_id": f"r{i}", "commit": f"c{i}", "short": f"c{i}", "dirty": False, "subject": "",
                "like": like, "inject": [], "cases": {k: {"max_abs": v, "passed": p} for k, (v, p) in cases.items()}}

    series = {"s": [point(0, "A", a=(1e-6, True), b=(1e-3, True)), point(1, "B", a=(1.0, True)),
                    point(2, "A", a=(9e-5, True), b=(2e-3, False)),
                    point(3, "A", a=(2e-3, True), b=(float("nan"), False)),
                    point(4, "A", a=(1e-9, True), b=(5.0, False))]}
    found = [(j["index"], j["case"], j["why"]) for j in history.jumps(series)]
    assert found == [(2, "b", "pass -> fail"), (3, "a", "x22.2"), (3, "b", "NaN")]
    assert [(j["index"], j["case"]) for j in history.jumps(series, factor=100.0)] == [(2, "b"), (3, "b")]
    with pytest.raises(InputError):
        history.jumps(series, factor=0.5)


def test_it_runs_in_a_core_install(timeline, tmp_path):
    """With mlx, torch, torchvision and transformers not importable, the history is still read and drawn."""
    reports, _ = timeline
    code = ("import importlib.abc, json, sys\n"
            "HIDDEN = ('mlx', 'torch', 'torchvision', 'transformers')\n"
            "class Hide(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in HIDDEN:\n"
            "            raise ModuleNotFoundError(name, name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "from pathlib import Path\n"
            "from parity import history\n"
            f"r = history.history([Path({str(reports)!r})], Path({str(tmp_path / 'h.sqlite')!r}), "
            f"Path({str(tmp_path / 'h.html')!r}))\n"
            "print(json.dumps([r['runs'], r['onsets'][0]['jump']['stage'], "
            "sorted(m for m in sys.modules if m.startswith('parity.adapters'))]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    runs, stage, loaded = json.loads(p.stdout)
    assert [runs, stage] == [6, "layers.0.mlp.out"]
    # the registry's family packages (their keyed options), never an adapter, its defects or its drivers
    assert not [m for m in loaded if m.rsplit(".", 1)[-1] in ("adapter", "defects", "stream")], loaded
