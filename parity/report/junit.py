"""JUnit XML rendered from the JSON record (nothing recomputed), for CI test-report UIs.

Layout (the attribute set of Jenkins' ``junit-10.xsd``, which GitHub and GitLab readers accept too):

    <testsuites name="rmlx-parity" tests failures errors time>
      <testsuite name="<case>" tests failures errors skipped time timestamp id package>
        <properties>   versions and settings of the run
        <testcase classname="<model>.<scenario>" name="<stage>" time>   one per stage, in forward order
          <failure type="ParityMismatch" message="one line">the assert_close-style message</failure>
        <testcase classname="<model>.<scenario>" name="logits@decode.<step>" time>   one per decode step

The classname is ``model.scenario`` with any dot inside either part replaced by ``_``: Jenkins splits
a classname at its last dot into package (the model) and class (the scenario); stage names, which
contain dots, are test names and are never split. Times: a case's seconds spread evenly over its
testcases. The output is pure ASCII (non-ASCII as character references) and characters XML 1.0
cannot carry (a control character in a stage name read from a dump) are replaced, so it always parses.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from parity.metrics import fmt
from parity.stages import decode_stage

_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
FAILURE_TYPE = "ParityMismatch"


def _text(v) -> str:
    """A string XML 1.0 can carry: every forbidden character becomes its ``\\xNN`` escape."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", str(v))


def _seconds(t) -> str:
    return f"{max(float(t or 0.0), 0.0):.3f}"  # the schema's SUREFIRE_TIME: digits, no exponent


def _index(v) -> str:
    return str(tuple(v)) if isinstance(v, list) else str(v)


def stage_message(st: dict) -> str:
    """``StageDiff.message()`` (torch's ``_make_mismatch_msg`` layout) from a record's stage entry."""
    head = f"Stage '{st['name']}' is not close!" if not st["passed"] else f"Stage '{st['name']}' is close."
    if st.get("error"):
        return f"{head}\n\n{st['error']}"
    t = st["tolerance"]
    return (f"{head}\n\n"
            f"Mismatched elements: {st['mismatched']} / {st['numel']} "
            f"({100 * st['mismatched'] / max(st['numel'], 1):.1f}%)\n"
            f"Greatest absolute difference: {fmt(st['max_abs'])} at index {_index(st['max_abs_index'])} "
            f"(up to {t['atol']:g} allowed)\n"
            f"Greatest relative difference: {fmt(st['max_rel'])} at index {_index(st['max_rel_index'])} "
            f"(up to {t['rtol']:g} allowed)")


def _stage_summary(st: dict) -> str:
    if st.get("error"):
        return f"{st['name']}: {st['error'].splitlines()[0]}"
    t = st["tolerance"]
    return (f"{st['name']}: {st['mismatched']} / {st['numel']} elements mismatched, max abs {fmt(st['max_abs'])} "
            f"(atol {t['atol']:g}, rtol {t['rtol']:g})")


def _decode_message(d: dict) -> str:
    extra = ", ".join(f"{k} {fmt(d[k])}" for k in ("top1_agreement", "kl_mean", "kl_max") if k in d)
    return (f"Decode step {d['step']} logits are not close!\n\n"
            f"Mismatched elements: {d['mismatched']}\n"
            f"Greatest absolute difference: {fmt(d['max_abs'])}\n"
            f"Token fed to both sides: {d['token']}" + (f"; {extra}" if extra else ""))


def _classname(case: dict) -> str:
    parts = [str(case.get(k) or "").replace(".", "_") for k in ("model", "scenario")]
    return ".".join(p for p in parts if p) or case["name"].replace(".", "_")


def _properties(rec: dict, case: dict) -> dict[str, str]:
    props = {"schema": rec.get("schema"), "run_id": rec.get("run_id"), "created": rec.get("created"),
             "command": rec.get("command")}
    props |= {f"versions.{k}": v for k, v in rec.get("versions", {}).items()}
    for k, v in rec.get("settings", {}).items():
        props[f"settings.{k}"] = ",".join(map(str, v)) if isinstance(v, list) else v
    if "compare" in case:
        props |= {"compare.reference": case["compare"].get("reference"),
                  "compare.candidate": case["compare"].get("candidate")}
    fd = case.get("first_divergence")
    props["first_divergence"] = fd["stage"] if fd else ""
    return {k: "" if v is None else v for k, v in props.items()}


def _failure(tc: ET.Element, message: str, text: str, kind: str = FAILURE_TYPE) -> None:
    f = ET.SubElement(tc, "failure", {"message": _text(message), "type": kind})
    f.text = _text(text)


def _case_suite(rec: dict, case: dict, index: int) -> ET.Element:
    classname = _classname(case)
    fd = case.get("first_divergence")
    tests: list[tuple[str, str | None, str | None]] = []  # (name, failure message, failure text)
    for st in case["stages"]:
        if st["passed"]:
            tests.append((st["name"], None, None))
            continue
        text = stage_message(st)
        if fd and fd["stage"] != st["name"]:
            text += f"\nFirst divergent stage: {fd['stage']}"
        tests.append((st["name"], _stage_summary(st), text))
    for d in case.get("decode", []):
        name = decode_stage(d["step"])
        tests.append((name, None, None) if d["passed"] else
                     (name, f"{name}: max abs {fmt(d['max_abs'])}", _decode_message(d)))
    # one root cause, one failure: a stage that fails after the case's first divergent one is reported
    # as skipped (downstream of it), so a dashboard shows the cause, not a wall of red
    first = next((i for i, (_, m, _) in enumerate(tests) if m is not None), None)
    downstream = {i for i, (_, m, _) in enumerate(tests) if m is not None and first is not None and i > first}
    failures = sum(m is not None for _, m, _ in tests) - len(downstream)
    seconds = float(case.get("seconds") or 0.0)
    suite = ET.Element("testsuite", {
        "name": _text(case["name"]), "tests": str(len(tests)), "failures": str(failures), "errors": "0",
        "skipped": str(len(downstream)), "time": _seconds(seconds),
        "timestamp": _text(str(rec.get("created", "")).rstrip("Z")),
        "id": str(index), "package": _text(case.get("model") or "")})
    props = ET.SubElement(suite, "properties")
    for k, v in _properties(rec, case).items():
        ET.SubElement(props, "property", {"name": _text(k), "value": _text(v)})
    each = seconds / len(tests) if tests else 0.0
    for i, (name, message, text) in enumerate(tests):
        tc = ET.SubElement(suite, "testcase", {"classname": _text(classname), "name": _text(name),
                                               "time": _seconds(each)})
        if i in downstream:
            skip = ET.SubElement(tc, "skipped", {"message": _text(
                f"downstream of the first divergence {tests[first][0]}; {message}")})
            skip.text = _text(text)
        elif message is not None:
            _failure(tc, message, text)
    return suite


def _missing_cases_suite(rec: dict, index: int) -> ET.Element | None:
    """``rmlx-parity compare`` of two folders: a case in one folder only is a failed test of its own."""
    cmp = rec.get("compare") or {}
    missing = [(name, "candidate") for name in cmp.get("cases_missing_in_candidate", [])]
    missing += [(name, "reference") for name in cmp.get("cases_missing_in_reference", [])]
    if not missing:
        return None
    suite = ET.Element("testsuite", {
        "name": "compare", "tests": str(len(missing)), "failures": str(len(missing)), "errors": "0",
        "skipped": "0", "time": _seconds(0), "timestamp": _text(str(rec.get("created", "")).rstrip("Z")),
        "id": str(index), "package": "compare"})
    for name, side in missing:
        tc = ET.SubElement(suite, "testcase", {"classname": "compare", "name": _text(name), "time": _seconds(0)})
        _failure(tc, f"case {name}: no {side} dump", f"Case '{name}' has no dump on the {side} side "
                 f"({cmp.get(side)})", "MissingCase")
    return suite


def to_junit(rec: dict) -> str:
    """The record as a JUnit XML document (a string, ASCII only)."""
    suites = [_case_suite(rec, case, i) for i, case in enumerate(rec["cases"])]
    extra = _missing_cases_suite(rec, len(suites))
    if extra is not None:
        suites.append(extra)
    root = ET.Element("testsuites", {
        "name": "rmlx-parity", "tests": str(sum(int(s.get("tests")) for s in suites)),
        "failures": str(sum(int(s.get("failures")) for s in suites)), "errors": "0",
        "time": _seconds(rec.get("wall_time_s"))})
    root.extend(suites)
    ET.indent(root)
    body = ET.tostring(root, encoding="us-ascii", xml_declaration=False).decode("ascii")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"
