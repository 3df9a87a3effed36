"""The terminal output of a run (parity.report.to_terminal) on records of real runs: 100 columns by
default, the full table with ``wide``, the verdict line last and naming the first divergence, and
ULPs shown as "—" where they mean nothing (parity.metrics.ulp_floor)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from parity.cli import main
from parity.report import (
    _COLS,
    NO_ULP,
    WIDTH,
    _rows,
    fit_table,
    forward_order,
    stage_summary,
    text_table,
    to_markdown,
    to_terminal,
    verdict_line,
)
from parity.report.html import to_html

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "models" / "tiny"
FAULT = "attn-scale-rsqrt"  # a decoder defect: text-4 shows it at layers.0.attn.out


def _run(tmp: Path, *extra: str) -> tuple[int, dict]:
    rc = main(["run", "--model", str(TINY), "--case", "text-4", "--no-oracle", "--decode-steps", "1",
               "--report-dir", str(tmp / "rep"), "--json", str(tmp / "r.json"), *extra])
    return rc, json.loads((tmp / "r.json").read_text())


@pytest.fixture(scope="module")
def passing(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("pass"))


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fail"), "--inject", FAULT)


def _last(text: str) -> str:
    return [line for line in text.split("\n") if line.strip()][-1]


def _too_wide(text: str) -> list[str]:
    return [line for line in text.split("\n") if len(line) > WIDTH]


def test_default_output_fits_100_columns(passing, failing):
    (rc_pass, ok), (rc_fail, bad) = passing, failing
    assert (rc_pass, rc_fail) == (0, 1) and ok["passed"] and not bad["passed"]
    for rec in (ok, bad):
        text = to_terminal(rec, notes=["report: reports/20260101T000000Z-0123456789-dirty/report.md; dumps: "
                                       "/tmp/a-dump-folder"])
        assert not _too_wide(text), _too_wide(text)
        header = text.split("\n")[3]
        assert header.split() == ["stage", "class", "pass", "max_abs", "atol", "/", "rtol", "min", "cos",
                                  "max", "ULP"]  # no oracle: the f64 ratio column is left out
        for st in rec["cases"][0]["stages"]:  # every stage has its row, whole, in forward order
            assert any(line.startswith(st["name"] + " ") for line in text.split("\n")), st["name"]


def test_default_output_fits_with_long_names_and_messages(failing):
    """Stage and case names, the injected defects, the failed cases and an error message far longer
    than usual still fit: the stage column gives way (ellipsis in the middle), the rest folds."""
    rec = copy.deepcopy(failing[1])
    case = rec["cases"][0]
    for st in case["stages"]:
        st["name"] = "vision.encoder.layers.12." + st["name"]
    rec["cases"] = [copy.deepcopy(case) | {"name": f"tiny-variant-with-a-long-name/image/solid-{i}", "passed": False}
                    for i in range(30)]
    rec["settings"]["inject"] = ["patch-ln1-eps", "posemb-xy-swap", "vision-causal", FAULT]
    stage = case["stages"][5]["name"]
    rec["first_divergence"] = {"stage": stage, "case": rec["cases"][0]["name"], "message": (
        f"Stage '{stage}' is not close!\n\nThe candidate raised NameError: name 'x' is not defined while "
        "computing this stage (at /work/main/rmlx/load.py:26 in load_raw_weights; the last stage it captured: "
        "none)")}
    text = to_terminal(rec)
    assert not _too_wide(text), _too_wide(text)
    assert "…" in text.split("\n")[5]  # a shortened stage name
    assert _last(text).startswith("rmlx parity FAIL: 0/30 cases pass; first divergence " + stage)


def test_wide_has_the_full_table(failing):
    rec = failing[1]
    lines = to_terminal(rec, wide=True).split("\n")
    table = text_table([_COLS] + _rows(rec))
    start = lines.index(table[0])
    assert lines[start:start + len(table)] == table
    for col in ("rtol", "atol", "max_ulp", "min cosine", "worst NMSE dB", "needs atol", "HF-vs-oracle", "f64 ratio"):
        assert col in table[0]
    assert max(map(len, table)) > WIDTH  # what the default leaves out
    assert lines[0].startswith("rmlx parity FAIL") and "mode free, dtype float32" in lines[0]  # unabridged


def test_verdict_and_first_divergence_are_last(passing, failing):
    rec = failing[1]
    fd = rec["first_divergence"]
    assert fd["stage"] == "layers.0.attn.out"
    for wide in (False, True):
        text = to_terminal(rec, wide=wide, notes=["report: reports/x/report.md"])
        lines = text.split("\n")
        assert _last(text) == lines[-1] == verdict_line(rec, None if wide else WIDTH)
        assert lines[-1].startswith("rmlx parity FAIL: 0/1 cases pass; first divergence layers.0.attn.out")
        assert sum(line.startswith("rmlx parity FAIL: 0/1 cases pass;") for line in lines) == 1  # one verdict line
        block = lines.index(f"First divergent stage: {fd['stage']} (case {fd['case']})")
        assert block > lines.index("report: reports/x/report.md")  # notes come before the divergence
        assert lines[block + 1] == f"Stage '{fd['stage']}' is not close!"
        assert "" not in lines[block + 3:-2]  # the message, then one blank line, then the verdict
    assert _last(to_terminal(passing[1])).startswith("rmlx parity PASS: 1/1 cases pass")


def test_verdict_line_gives_way_in_order():
    rec = {"passed": False, "wall_time_s": 3.25, "cases": [{"passed": False}] * 2,
           "first_divergence": {"stage": "mask.sliding_attention", "case": "tiny/image/a-rather-long-image-name"},
           "logits": {"top1_agreement": 0.5, "kl_mean": 0.72}}
    full = verdict_line(rec)
    where = "rmlx parity FAIL: 0/2 cases pass; first divergence mask.sliding_attention"
    case = " in tiny/image/a-rather-long-image-name"
    assert full == where + case + "; same top token 50.00%, KL mean 0.72 (3.2 s)" == verdict_line(rec, len(full))
    assert verdict_line(rec, len(full) - 1) == where + case + " (3.2 s)"
    assert verdict_line(rec, len(where + case)) == where + case
    assert verdict_line(rec, len(where + case) - 1) == where + " (3.2 s)"
    assert verdict_line(rec, len(where)) == where
    assert verdict_line(rec, 40) == where[:39] + "…"


def test_fit_table_shortens_the_stage_column_then_drops_class():
    rows = [("stage", "class", "pass", "a"), ("layers.12.input_layernorm", "layernorm", "1/1", "x" * 40)]
    assert fit_table(rows, 90) == text_table(rows)
    shortened = fit_table(rows, 76)
    assert max(map(len, shortened)) == 76 and "class" in shortened[0]
    assert shortened[2].startswith("layers.1…ayernorm ")
    dropped = fit_table(rows, 62)  # the stage column would be under 16: the class column goes instead
    assert max(map(len, dropped)) == 62 and "class" not in dropped[0]
    assert dropped[2].startswith("layers.…ernorm ")
    assert fit_table([("stage", "class", "pass", "f64 ratio"), ("s", "c", "1/1", "-")], 100) == ["stage  class  pass",
                                                                                                "-----  -----  ----",
                                                                                                "s      c      1/1"]


def test_stage_rows_in_forward_order():
    """A stage first met in a later case goes where the forward pass has it, not at the end."""
    text = ["text.embed_tokens", "mask.full_attention", "layers.0.out", "logits"]
    image = ["image.pixel_values", "vision.soft_tokens", "text.embed_tokens", "mask.full_attention", "layers.0.out",
             "logits"]
    audio = ["image.pixel_values", "vision.soft_tokens", "audio.soft_tokens", "text.embed_tokens", "logits"]
    assert forward_order([text, image, audio]) == ["image.pixel_values", "vision.soft_tokens", "audio.soft_tokens",
                                                   "text.embed_tokens", "mask.full_attention", "layers.0.out", "logits"]
    assert forward_order([image, text]) == image


def test_no_ulp_is_a_dash_in_every_report(failing):
    """A stage whose max_ulp is null in every case reads "—"; one with numbers in some cases gets their max."""
    rec = copy.deepcopy(failing[1])
    second = copy.deepcopy(rec["cases"][0]) | {"name": "tiny/text-4-again"}
    rec["cases"].append(second)
    stages = [s for s in rec["cases"][0]["stages"] if not s.get("error")]
    near_zero, mixed = stages[0]["name"], stages[1]["name"]
    for case in rec["cases"]:
        for st in case["stages"]:
            if st["name"] == near_zero:
                st["max_ulp"] = None
    for st in second["stages"]:
        if st["name"] == mixed:
            st["max_ulp"] = None
    rows = {r["stage"]: r for r in stage_summary(rec)}
    assert rows[near_zero]["max_ulp"] is None
    assert rows[mixed]["max_ulp"] == stages[1]["max_ulp"] is not None
    line = next(x for x in to_terminal(rec).split("\n") if x.startswith(near_zero + " "))
    assert line.split()[-1] == NO_ULP
    wide = next(x for x in to_terminal(rec, wide=True).split("\n") if x.startswith(near_zero + " "))
    assert f"  {NO_ULP}  " in wide
    assert f"| {near_zero} |" in to_markdown(rec) and f"| {NO_ULP} |" in to_markdown(rec)
    assert f"<td>{NO_ULP}</td>" in to_html(rec)
