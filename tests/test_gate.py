"""Baselines and gates: the committed baselines pass on the embedded default, a planted defect fails the
gate (exit 1) naming its stage, bad baselines are bad input (exit 2) before any work, and only
``--update-baseline`` writes one -- atomically, and never from a failing run."""

import copy
import json

import pytest

from parity import gate, provenance
from parity.adapters.gemma4_unified import FAMILY
from parity.adapters.gemma4_unified.defects import CATALOG, expected_stage
from parity.cli import main
from parity.defects import matches
from rmlx.errors import InputError
from rmlx.models.gemma4_unified.config import ModelArgs
from tests.conftest import FIXTURES, MODELS, UNIFIED_MODELS

BASELINES = FIXTURES / "baselines"
TINY = next(m for m in MODELS if m.name == "tiny")
ONE_CASE = ["--model", str(TINY), "--case", "image/gradient", "--no-oracle"]


@pytest.mark.parametrize("mode", ["free", pytest.param("teacher", marks=pytest.mark.slow)])
def test_committed_baseline_passes_on_the_default_run(default_runs, mode):
    """The same record `rmlx-parity gate --baseline fixtures/baselines/float32-<mode>.json` gates."""
    code, rec, _ = default_runs("float32", mode, "official")
    result = gate.check(rec, gate.load(BASELINES / f"float32-{mode}.json"))
    assert code == 0 and result["passed"], gate.summary(result)
    assert result["cases"] == len(rec["cases"]) and result["not_run"] == []
    assert result["checked"] == sum(len(c["stages"]) + len(c["decode"]) for c in rec["cases"])


def test_gate_cli_passes_on_a_subset(tmp_path, capsys):
    code = main(["gate", "--baseline", str(BASELINES / "float32-free.json"), *ONE_CASE,
                 "--report-dir", str(tmp_path / "rep"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["gate"]["passed"] and len(rec["gate"]["not_run"]) > 0  # the other baseline cases were not run
    assert "gate PASS" in out and "## Gate" in (tmp_path / "rep" / "report.md").read_text()


FAST = ("vision-causal", "sliding-cache-off-by-one")
# not on a single-image, unquantized case: a second image, audio, a load refusal (exit 2), or a setting the
# float32 baseline does not run (the MXFP8 codec defects need --quantize)
ELSEWHERE = ("overlay-crosses-blocks", "audio-rmsnorm-skipped", "k-eq-v-ignored",
             *(n for n, d in CATALOG.items() if d.settings))


@pytest.mark.parametrize("name", FAST)
def test_gate_fails_on_a_planted_defect_naming_its_stage(name, tmp_path, capsys):
    code = main(["gate", "--baseline", str(BASELINES / "float32-free.json"), *ONE_CASE, "--inject", name,
                 "--report-dir", str(tmp_path / "rep"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    rec = json.loads((tmp_path / "r.json").read_text())
    first = rec["gate"]["regressions"][0]["stage"]
    assert code == 1 and not rec["gate"]["passed"]
    case = rec["cases"][0]
    a = ModelArgs.from_file(TINY / "config.json")
    expected = expected_stage(CATALOG[name], a.text.layer_types, [s["name"] for s in case["stages"]])
    assert matches(first, expected), (first, expected)
    assert f"First regression: {first} in case tiny/image/gradient" in out


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CATALOG if n not in FAST + ELSEWHERE])
def test_gate_fails_on_every_planted_defect_naming_its_stage(name, tmp_path, capsys):
    """Every other defect of the catalog, on the self-test's cases of every fixture model (a defect may
    show only on a short prompt, an image over the pixel budget or one model's configuration), at the
    baseline's budget: the first regression is at the defect's stage for its case."""
    cases = [a for c in FAMILY.selftest_cases for a in ("--case", c)]
    models = [a for m in UNIFIED_MODELS for a in ("--model", str(m))]  # the catalog is this family's
    code = main(["gate", "--baseline", str(BASELINES / "float32-free.json"), *models, *cases, "--inject", name,
                 "--report-dir", str(tmp_path / "rep"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    rec = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and not rec["gate"]["passed"] and rec["gate"]["regressions"], out[-2000:]
    first = rec["gate"]["regressions"][0]
    case = next(c for c in rec["cases"] if c["name"] == first["case"])
    a = ModelArgs.from_file(FIXTURES / "models" / case["model"] / "config.json")
    expected = expected_stage(CATALOG[name], a.text.layer_types, [s["name"] for s in case["stages"]])
    assert matches(first["stage"], expected), (first, expected)
    assert f"First regression: {first['stage']} in case {first['case']}" in out


def test_drift_within_tolerance_is_caught(default_runs):
    """A stage that still passes parity but grew past baseline x ratio + floor fails the gate."""
    _, rec, _ = default_runs("float32", "free", "official")
    base = gate.from_record(rec)
    case = rec["cases"][0]["name"]
    worst = max(rec["cases"][0]["stages"], key=lambda s: s["max_abs"])
    shrunk = copy.deepcopy(base)
    shrunk["cases"][case]["stages"][worst["name"]] = worst["max_abs"] / 10
    result = gate.check(rec, shrunk, ratio=2.0, floor=0.0)
    assert not result["passed"] and rec["passed"]  # parity passes; the gate does not
    assert [(r["case"], r["stage"]) for r in result["regressions"]] == [(case, worst["name"])]
    assert gate.check(rec, shrunk, ratio=20.0, floor=0.0)["passed"]
    assert gate.check(rec, base, ratio=1.0, floor=0.0)["passed"]  # a run equals its own baseline


def test_a_baseline_from_another_machine_gets_the_cross_machine_ratio(default_runs):
    """The last bits of a stage's error depend on the processor's kernels: against a baseline another
    machine recorded (or one that does not say), the ratio is the cross-machine one, and the summary
    names what differs."""
    _, rec, _ = default_runs("float32", "free", "official")
    assert rec["versions"]["cpu"] == provenance.cpu()
    case = rec["cases"][0]["name"]
    worst = max(rec["cases"][0]["stages"], key=lambda s: s["max_abs"])
    base = gate.from_record(rec)
    base["cases"][case]["stages"][worst["name"]] = worst["max_abs"] / 5  # grown 5x: past 2x, within 8x
    here = gate.check(rec, base, floor=0.0)
    assert here["machine"] == {"same": True, "differs": {}} and here["ratio"] == gate.DEFAULT_RATIO
    assert [(r["case"], r["stage"]) for r in here["regressions"]] == [(case, worst["name"])]
    assert "another machine" not in gate.summary(here)

    for cpu in ("Intel(R) Xeon(R) Platinum 8488C; avx512f; 2 cores", None):
        there = copy.deepcopy(base)
        there["versions"]["cpu"] = cpu
        result = gate.check(rec, there, floor=0.0)
        assert result["passed"] and result["ratio"] == gate.DEFAULT_CROSS_RATIO
        assert result["machine"] == {"same": False, "differs": {"cpu": [cpu, rec["versions"]["cpu"]]}}
        said = "not recorded" if cpu is None else repr(cpu)
        assert (f"recorded on another machine (cpu {said} there, {rec['versions']['cpu']!r} here): "
                f"the last bits round differently, so the ratio is x 8, not x 2") in gate.summary(result)
        assert not gate.check(rec, there, floor=0.0, cross_ratio=4.0)["passed"]
    del there["versions"]
    assert set(gate.check(rec, there)["machine"]["differs"]) == set(gate.MACHINE)


def test_settings_mismatch_is_bad_input_before_the_run(tmp_path, capsys):
    code = main(["gate", "--baseline", str(BASELINES / "float32-teacher.json"), *ONE_CASE,
                 "--report-dir", str(tmp_path / "rep")])
    assert code == 2 and "mode: baseline 'teacher', run 'free'" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()
    for drift in (["--drift-ratio", "0.5"], ["--drift-floor", "inf"], ["--drift-ratio", "nan"],
                  ["--drift-ratio", "1e300"], ["--cross-machine-ratio", "0"], ["--cross-machine-ratio", "inf"]):
        assert main(["gate", "--baseline", str(BASELINES / "float32-free.json"), *ONE_CASE, *drift,
                     "--report-dir", str(tmp_path / "rep")]) == 2
        assert "--drift-ratio and --cross-machine-ratio must be finite" in capsys.readouterr().err


def test_uncovered_cases_are_bad_input_and_missing_stages_regress(default_runs):
    _, rec, _ = default_runs("float32", "free", "official")
    partial = gate.from_record(rec)
    partial["cases"].pop(rec["cases"][-1]["name"])
    with pytest.raises(InputError, match="does not cover"):
        gate.check(rec, partial)
    dropped = copy.deepcopy(rec)
    case = dropped["cases"][0]
    case["stages"] = [s for s in case["stages"] if s["name"] != "logits"]  # a stage vanished from the run
    result = gate.check(dropped, gate.from_record(rec))
    assert not result["passed"] and [(r["stage"], r["max_abs"]) for r in result["regressions"]] == [
        ("logits", "missing")]


def test_a_stage_the_candidate_could_not_produce_regresses_first(tmp_path):
    """A candidate that raises while preprocessing leaves every stage without numbers (max_abs 0, an
    error): each is a regression ("failed"), the first one the stage where it raised, not a decode step."""
    model = str(FIXTURES / "models" / "config-defaults")  # its pixel budget leaves a 4x1200 sliver 300 patches
    code = main(["gate", "--baseline", str(BASELINES / "float32-free.json"), "--model", model,
                 "--case", "image/sliver-4x1200", "--inject", "aspect-clamp-missing", "--no-oracle",
                 "--report-dir", str(tmp_path / "rep"), "--json", str(tmp_path / "r.json")])
    rec = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and rec["cases"][0]["error"]["stage"] == "image.pixel_values"
    regs = rec["gate"]["regressions"]
    assert (regs[0]["stage"], regs[0]["max_abs"]) == ("image.pixel_values", "failed")
    assert {r["stage"] for r in regs if r["max_abs"] == "failed"} >= {"image.pixel_values", "logits"}


def test_a_nan_error_is_a_regression(default_runs):
    _, rec, _ = default_runs("float32", "free", "official")
    base = gate.from_record(rec)
    broken = copy.deepcopy(rec)
    broken["cases"][0]["decode"][0]["max_abs"] = None  # JSON's NaN
    result = gate.check(broken, base)
    assert not result["passed"] and result["regressions"][0]["stage"] == "logits@decode.1"
    assert "nan >" in gate.summary(result)


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{not json", "not readable JSON"),
    ('{"schema": "rmlx.baseline/1", "settings": {}, "cases": {"c": {"stages": {}, "decode": []}}}',
     "settings lack"),
    ('{"schema": "rmlx.parity/2"}', "schema is 'rmlx.parity/2'"),
    ('{"schema": "rmlx.baseline/1", "settings": {}, "cases": {}}', "settings lack"),
])
def test_bad_baseline_is_exit_2_before_any_work(content, message, tmp_path, capsys):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    code = main(["gate", "--baseline", str(path), *ONE_CASE, "--report-dir", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(path) in err
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("table, key, value, message", [
    ("stages", "vision.patch_ln1", "oops", "stage 'vision.patch_ln1' has value 'oops'"),
    ("stages", "logits", -1.0, "stage 'logits' has value -1.0"),
    ("decode", None, [], "malformed 'decode' table"),
    ("quantization_kl_max", None, "x", "value 'quantization_kl_max' has value 'x'"),
])
def test_corrupted_value_names_case_and_key(table, key, value, message, tmp_path, capsys):
    data = json.loads((BASELINES / "float32-free.json").read_text())
    case = next(iter(data["cases"]))
    if key is None:
        data["cases"][case][table] = value
    else:
        data["cases"][case][table][key] = value
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    assert main(["gate", "--baseline", str(path), *ONE_CASE, "--report-dir", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert case in err and message in err and str(path) in err


def test_update_baseline_writes_atomically_and_round_trips(tmp_path):
    path = tmp_path / "base" / "b.json"
    args = ["gate", "--baseline", str(path), *ONE_CASE, "--decode-steps", "1"]
    assert main([*args, "--update-baseline", "--report-dir", str(tmp_path / "r0")]) == 0
    data = gate.load(path)
    assert list(data["cases"]) == ["tiny/image/gradient"] and data["settings"]["decode_steps"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]  # no temporary file left behind
    assert main([*args, "--report-dir", str(tmp_path / "r1")]) == 0


def test_update_baseline_refuses_a_failing_run(tmp_path, capsys):
    path = tmp_path / "b.json"
    code = main(["gate", "--baseline", str(path), *ONE_CASE, "--inject", "patch-ln1-eps", "--update-baseline",
                 "--report-dir", str(tmp_path / "rep")])
    assert code == 1 and not path.exists() and "NOT written" in capsys.readouterr().err
