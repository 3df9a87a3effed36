"""junit.xml from real runs: the structure of Jenkins' junit-10.xsd, counts equal to the children,
failures exactly on the failing stages, with the assert_close-style message of the record.

No XML-schema library is a dependency, so ``check_junit`` validates the junit-10.xsd layout by hand:
element nesting, required and allowed attributes, integer counts matching the children, time format.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from parity.cli import main
from parity.report.junit import to_junit

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "models" / "tiny"

# junit-10.xsd (jenkinsci/xunit-plugin): allowed attributes, required ones, allowed children
SUITES_ATTRS = {"name", "time", "tests", "failures", "errors"}
SUITE_ATTRS = {"name", "tests", "failures", "errors", "group", "time", "skipped", "timestamp", "hostname", "id",
               "package", "file", "log", "url"}
SUITE_REQUIRED = {"name", "tests", "failures", "errors"}
SUITE_CHILDREN = {"testsuite", "properties", "testcase", "system-out", "system-err"}
CASE_ATTRS = {"name", "time", "classname", "group"}
CASE_CHILDREN = {"skipped", "error", "failure", "system-out", "system-err"}
SUREFIRE_TIME = re.compile(r"(([0-9]{0,3},)*[0-9]{3}|[0-9]{0,3})*(\.[0-9]*)?")
TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}")  # JUnit.xsd: no zone


def check_junit(text: str) -> ET.Element:
    """Validate ``text`` against the junit-10.xsd layout; returns the root."""
    root = ET.fromstring(text)
    assert root.tag == "testsuites"
    assert set(root.attrib) <= SUITES_ATTRS, set(root.attrib) - SUITES_ATTRS
    assert SUREFIRE_TIME.fullmatch(root.get("time")), root.get("time")
    totals = {"tests": 0, "failures": 0, "errors": 0}
    for suite in root:
        assert suite.tag == "testsuite"
        assert SUITE_REQUIRED <= set(suite.attrib) <= SUITE_ATTRS, set(suite.attrib) ^ SUITE_ATTRS
        assert SUREFIRE_TIME.fullmatch(suite.get("time")), suite.get("time")
        assert TIMESTAMP.fullmatch(suite.get("timestamp")), suite.get("timestamp")
        assert {c.tag for c in suite} <= SUITE_CHILDREN
        assert len(suite.findall("properties")) <= 1
        for prop in suite.findall("properties/*"):
            assert prop.tag == "property" and set(prop.attrib) == {"name", "value"}
        cases = suite.findall("testcase")
        counts = {"tests": len(cases), "failures": len(suite.findall("testcase/failure")),
                  "errors": len(suite.findall("testcase/error")), "skipped": len(suite.findall("testcase/skipped"))}
        for k, n in counts.items():
            assert int(suite.get(k, "0")) == n, (suite.get("name"), k, suite.get(k), n)
        for k in totals:
            totals[k] += counts[k]
        for case in cases:
            assert "name" in case.attrib and set(case.attrib) <= CASE_ATTRS, case.attrib
            assert SUREFIRE_TIME.fullmatch(case.get("time"))
            assert {c.tag for c in case} <= CASE_CHILDREN
            for f in case.findall("failure"):
                assert set(f.attrib) <= {"message", "type"} and "\n" not in f.get("message")
    for k, n in totals.items():
        assert int(root.get(k)) == n, (k, root.get(k), n)
    return root


def _run(tmp: Path, *extra: str) -> tuple[int, dict, Path]:
    rc = main(["run", "--model", str(TINY), "--case", "image/gradient", "--no-oracle", "--decode-steps", "1",
               "--report-dir", str(tmp / "rep"), "--json", str(tmp / "r.json"), *extra])
    return rc, json.loads((tmp / "r.json").read_text()), tmp / "rep"


@pytest.fixture(scope="module")
def passing(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("pass"))


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fail"), "--inject", "patch-ln1-eps")


def _failures(root: ET.Element) -> dict[str, ET.Element]:
    return {tc.get("name"): tc.find("failure") for tc in root.iter("testcase") if tc.find("failure") is not None}


def test_passing_run(passing):
    rc, rec, rep = passing
    assert rc == 0
    text = (rep / "junit.xml").read_text()
    root = check_junit(text)
    assert text.isascii() and text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    assert root.get("name") == "rmlx-parity" and root.get("failures") == "0"
    (case,) = rec["cases"]
    (suite,) = root
    assert suite.get("name") == "tiny/image/gradient" == case["name"]
    assert suite.get("timestamp") + "Z" == rec["created"]
    assert float(suite.get("time")) == pytest.approx(case["seconds"], abs=1e-3)
    names = [tc.get("name") for tc in suite.iter("testcase")]
    assert names == [s["name"] for s in case["stages"]] + ["logits@decode.1"]
    assert {tc.get("classname") for tc in suite.iter("testcase")} == {"tiny.image/gradient"}  # package.class
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    for k in ("transformers", "torch", "mlx", "numpy"):
        assert props[f"versions.{k}"] == rec["versions"][k]
    assert (props["settings.mode"], props["settings.dtype"], props["settings.mask_policy"], props["settings.inject"]
            ) == ("free", "float32", "official", "")
    assert not _failures(root)


def test_rendered_from_the_record_alone(passing, failing):
    for _, _, rep in (passing, failing):
        assert to_junit(json.loads((rep / "report.json").read_text())) == (rep / "junit.xml").read_text()


def test_failing_run(failing):
    rc, rec, rep = failing
    assert rc == 1
    root = check_junit((rep / "junit.xml").read_text())
    (case,) = rec["cases"]
    failing_stages = [s["name"] for s in case["stages"] if not s["passed"]]
    failing_steps = [f"logits@decode.{d['step']}" for d in case["decode"] if not d["passed"]]
    failures = _failures(root)
    assert failing_stages[0] == "vision.patch_ln1" == rec["first_divergence"]["stage"]
    assert list(failures) == ["vision.patch_ln1"]  # one root cause, one failure
    skipped = {tc.get("name"): tc.find("skipped") for tc in root.iter("testcase") if tc.find("skipped") is not None}
    assert list(skipped) == failing_stages[1:] + failing_steps  # the rest: downstream of it, in forward order
    assert all(s.get("message").startswith("downstream of the first divergence vision.patch_ln1; ")
               for s in skipped.values())
    assert root.get("failures") == "1" and root.get("tests") == str(len(case["stages"]) + 1)
    first = failures["vision.patch_ln1"]
    assert first.get("type") == "ParityMismatch"
    assert first.text == rec["first_divergence"]["message"]  # the StageDiff.message() layout, to the byte
    assert "Mismatched elements" in first.text and "Greatest absolute difference" in first.text
    assert first.get("message").startswith("vision.patch_ln1: ") and "mismatched" in first.get("message")
    for name in failing_stages[1:]:
        assert skipped[name].text.endswith("\nFirst divergent stage: vision.patch_ln1")
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["settings.inject"] == "patch-ln1-eps" and props["first_divergence"] == "vision.patch_ln1"


def test_errors_decode_steps_and_escaping(failing):
    """A structural error is a failure, a failed decode step after it is skipped (downstream); names that
    XML cannot carry as they
    are (markup characters, a control character, non-ASCII) survive a parse."""
    _, rec, _ = failing
    rec = json.loads(json.dumps(rec))
    case = rec["cases"][0]
    odd = 'x<&"]]>\x01é'
    case["stages"][0] |= {"name": odd, "passed": False, "error": "Shape mismatch: candidate (1, 2), reference (1, 3)"}
    case["decode"][0] |= {"passed": False, "max_abs": 0.25, "mismatched": 7}
    text = to_junit(rec)
    assert text.isascii()
    root = check_junit(text)
    failures = _failures(root)
    assert failures["x<&\"]]>\\x01é"].text == "Stage 'x<&\"]]>\\x01é' is not close!\n\n" \
        "Shape mismatch: candidate (1, 2), reference (1, 3)\nFirst divergent stage: vision.patch_ln1"
    step = next(tc.find("skipped") for tc in root.iter("testcase") if tc.get("name") == "logits@decode.1")
    assert "downstream of the first divergence" in step.get("message")
    assert "Greatest absolute difference: 0.25" in step.text
    assert step.text.startswith("Decode step 1 logits are not close!\n\nMismatched elements: 7")


def test_the_validator_rejects_miscounts(passing):
    _, _, rep = passing
    text = (rep / "junit.xml").read_text()
    for bad in (text.replace('failures="0"', 'failures="1"', 1), text.replace("<testcase ", "<testcase bogus='1' ", 1),
                text.replace("<properties>", "<properties><oops/>", 1)):
        with pytest.raises(AssertionError):
            check_junit(bad)
