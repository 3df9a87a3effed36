"""`rmlx-parity selftest`: every catalogued defect is detected (both modes) and localised at its declared
stage (teacher-forced), the clean port raises no false alarm -- and the self-test itself fails when the
harness would let a defect escape or blame the wrong stage."""

import json
from dataclasses import replace

import pytest

from parity import tolerances
from parity.adapter import defect_catalog, families
from parity.adapters.gemma4_unified import defects
from parity.cli import main
from parity.metrics import Tol
from tests.conftest import MODELS

TINY = next(m for m in MODELS if m.name == "tiny")
EVERY = defect_catalog()  # the defects of every registered family (the self-test plants each)

AREAS = {"preprocessing", "embedder", "masks", "rope", "attention", "mlp", "norms", "residual", "logits", "loader",
         "audio", "quantization"}


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest")
    code = main(["selftest", "--report-dir", str(out / "rep"), "--json", str(out / "s.json")])
    return code, json.loads((out / "s.json").read_text()), out


def test_catalog_is_wide_enough():
    assert len(defects.CATALOG) >= 20
    assert {f.area for f in defects.CATALOG.values()} >= AREAS
    assert len(families()["gemma4"].defects) >= 6  # the SigLIP control path
    for f in EVERY.values():
        assert f.imitates and f.stage and f.name == f.name.strip()


def test_selftest_catches_and_localises_every_defect(selftest):
    code, rec, out = selftest
    assert code == 0, [o for o in rec["outcomes"] if not o["ok"]]
    assert rec["passed"] and rec["detection_score"] == 1.0 and rec["localisation_score"] == 1.0
    assert rec["false_alarms"] == [] and rec["escaped"] == [] and rec["mislocalised"] == []
    assert rec["faults"] == len(EVERY)
    planted = {(o["fault"], o["mode"]) for o in rec["outcomes"] if o["fault"] in EVERY}
    assert planted == {(n, m) for n in EVERY for m in ("teacher", "free")}
    for o in rec["outcomes"]:  # teacher-forced: every failing case first fails at the stage its model implies
        if o["fault"] in EVERY and o["mode"] == "teacher":
            assert o["localised"] and o["misplaced"] == [], o
            assert o["found"] or EVERY[o["fault"]].stage == "load", o
    clean = [o for o in rec["outcomes"] if o["fault"] not in EVERY]
    assert {o["mode"] for o in clean} == {"teacher", "free"}
    assert len(clean) == 6  # both modes: unified plain and quantized, gemma4 plain
    assert all(o["cases"] > 0 and o["failed_cases"] == 0 for o in clean)


def test_selftest_report_has_the_table(selftest):
    _, rec, out = selftest
    md = (out / "rep" / "selftest.md").read_text()
    assert "| defect | area | expected stage | found (teacher) | found (free) | detected | localised | ok |" in md
    for name in EVERY:
        assert f"| {name} |" in md
    assert "detection 100%, localisation 100%, false alarms 0" in md
    assert json.loads((out / "rep" / "selftest.json").read_text())["outcomes"] == rec["outcomes"]


def test_selftest_fails_on_a_mislocalised_defect(monkeypatch, tmp_path, capsys):
    """Declare the wrong stage for a defect: the self-test must say it was not localised (exit 1)."""
    f = defects.CATALOG["rope-interleaved"]
    monkeypatch.setitem(defects.CATALOG, f.name, replace(f, stage="layers.1.attn.q"))
    code = main(["selftest", "--fault", f.name, "--mode", "teacher", "--model", str(TINY),
                 "--report-dir", str(tmp_path / "rep"), "--json", str(tmp_path / "s.json")])
    rec = json.loads((tmp_path / "s.json").read_text())
    assert code == 1 and rec["mislocalised"] == [f.name] and rec["localisation_score"] == 0.0
    assert "mislocalised: rope-interleaved" in capsys.readouterr().out


def test_selftest_fails_when_a_defect_escapes(monkeypatch, tmp_path):
    """A harness whose tolerances swallow the defect must not pass its self-test."""
    wide = Tol(rtol=1.0, atol=1e9)
    for table in (tolerances.TOLERANCES, tolerances.TEACHER_TOLERANCES):
        monkeypatch.setitem(table, "attention", {"float32": wide, "bfloat16": wide})
    for table in (tolerances.TOLERANCES, tolerances.TEACHER_TOLERANCES):
        for cls in ("residual", "mlp", "norm", "logits"):
            monkeypatch.setitem(table, cls, {"float32": wide, "bfloat16": wide})
    monkeypatch.setattr(tolerances, "NOISE_RATIOS", {})  # and no float64 noise floor behind them
    code = main(["selftest", "--fault", "attn-scale-rsqrt", "--model", str(TINY),
                 "--report-dir", str(tmp_path / "rep"), "--json", str(tmp_path / "s.json")])
    rec = json.loads((tmp_path / "s.json").read_text())
    assert code == 1 and rec["escaped"] == ["attn-scale-rsqrt"] and rec["detection_score"] == 0.0


def test_selftest_fails_on_a_false_alarm(monkeypatch, tmp_path):
    """A tolerance tighter than the clean port's own error: the clean run fails, a false alarm (exit 1)."""
    monkeypatch.setitem(tolerances.TEACHER_TOLERANCES, "attention", {"float32": Tol(rtol=0.0, atol=0.0)})
    code = main(["selftest", "--fault", "bgr-patchify", "--mode", "teacher", "--model", str(TINY),
                 "--report-dir", str(tmp_path / "rep"), "--json", str(tmp_path / "s.json")])
    rec = json.loads((tmp_path / "s.json").read_text())
    assert code == 1 and len(rec["false_alarms"]) == 1 and rec["false_alarms"][0]["found"][0].endswith("attn.q")
    assert rec["detection_score"] == 1.0  # the planted defect itself is still caught


def test_injected_environment_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RMLX_INJECT", "softcap-skipped")
    assert main(["selftest", "--report-dir", str(tmp_path / "rep")]) == 2
    assert "RMLX_INJECT=softcap-skipped is set" in capsys.readouterr().err


def test_unknown_fault_is_bad_usage(tmp_path, capsys):
    assert main(["selftest", "--fault", "no-such-bug", "--report-dir", str(tmp_path / "rep")]) == 2
    assert "no-such-bug" in capsys.readouterr().err and not (tmp_path / "rep").exists()
