"""``rmlx-parity compare`` on real dumps: one ``run --dump`` of a tiny case, then copies of its two
sides edited the way another port's dumps could differ (a perturbed stage, a renamed key, a corrupt
file, other inputs, bf16 tensors, a folder layout)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from parity.adapters.gemma4_unified.stages import _LINEARS, stages_for
from parity.cli import main
from parity.stages import classify, order_key
from parity.tolerances import tolerance
from rmlx.models.gemma4_unified.config import ModelArgs
from tests.conftest import MODELS

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "models" / "tiny"
CASE = "tiny/image/gradient"


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    """(run record, the case's dump folder) of one real run."""
    tmp = tmp_path_factory.mktemp("dumped")
    rc = main(["run", "--model", str(TINY), "--case", "image/gradient", "--no-oracle", "--decode-steps", "1",
               "--report-dir", str(tmp / "rep"), "--json", str(tmp / "r.json"), "--dump", str(tmp / "dump")])
    assert rc == 0
    return json.loads((tmp / "r.json").read_text()), tmp / "dump" / CASE.replace("/", "__")


def cli(capfd, *argv) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return rc, out, err


def compare(capfd, tmp: Path, ref: Path, cand: Path | None = None, *extra) -> tuple[int, str, str, dict | None]:
    """Run ``compare`` into ``tmp/rep`` and ``tmp/c.json``; the record is None when nothing was written."""
    rc, out, err = cli(capfd, "compare", ref, *([cand] if cand else []), "--report-dir", tmp / "rep",
                       "--json", tmp / "c.json", *extra)
    rec = json.loads((tmp / "c.json").read_text()) if (tmp / "c.json").exists() else None
    return rc, out, err, rec


def edited(src: Path, dst: Path, edit) -> Path:
    """Copy of a dump with ``edit(arrays)`` applied, its metadata kept."""
    with safe_open(str(src), "np") as f:
        meta = f.metadata()
    arrays = load_file(str(src))
    edit(arrays)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(dst), metadata=meta)
    return dst


def assert_refused(rc: int, out: str, err: str, tmp: Path, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, (rc, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not (tmp / "rep").exists() and not (tmp / "c.json").exists()
    assert not list(tmp.glob(".rep.*")), "no half-written report folder"


def failing(rec: dict) -> list[str]:
    return [s["name"] for s in rec["cases"][0]["stages"] if not s["passed"]]


# ---------------------------------------------------------------------------------------------
# stage names without a config


def test_classify_and_order_cover_every_stage_table():
    for model in MODELS:
        cfg = ModelArgs.from_file(model / "config.json")
        weights = frozenset(["vision.patch_dense.weight"] + [f"layers.{i}.{w}.weight" for i in range(
            cfg.text.num_hidden_layers) for w in _LINEARS])
        table = stages_for(cfg.text, True, True, weights)
        names = [s.name for s in table]
        assert sorted(reversed(names), key=order_key) == names  # forward order, layer 10 after layer 9
        for s in table:
            assert (classify(s.name).name, classify(s.name).tol) == (s.name, s.tol)
    assert sorted(["layers.10.out", "layers.9.out", "layers.9.attn.q_proj.weight", "logits", "zz",
                   "mask.full_attention", "layers.9.input_layernorm"], key=order_key) == [
        "mask.full_attention", "layers.9.input_layernorm", "layers.9.attn.q_proj.weight", "layers.9.out",
        "layers.10.out", "logits", "zz"]
    for unknown in ("layers.01.out", "layers.-1.out", "layers.3.attn.query", "layers.3.out.weight", "mask.causal",
                    "vision.patch_ln1.weight", "text.logits", "input.input_ids", ""):
        assert classify(unknown) is None, unknown


# ---------------------------------------------------------------------------------------------
# compare


def test_own_dump_matches_the_run(dumped, tmp_path, capfd):
    run, case_dir = dumped
    rc, out, err, rec = compare(capfd, tmp_path, case_dir / "reference.safetensors", case_dir / "candidate.safetensors")
    assert rc == 0, err
    assert rec["schema"] == run["schema"] and rec["passed"] and rec["first_divergence"] is None
    assert rec["settings"]["dtype"] == "float32" and rec["settings"]["mode"] == "free"
    # the run's dumps state their soft-token budget, mask policies and attention: the record shows what they say
    assert [rec["settings"][k] for k in ("max_soft_tokens", "mask_policy", "candidate_mask_policy",
                                         "attn_implementation")] == [
        run["settings"]["max_soft_tokens"], run["settings"]["mask_policy"], run["settings"]["candidate_mask_policy"],
        run["settings"]["attn_implementation"]]
    assert rec["compare"]["metadata"]["reference"]["config_sha256"] == rec["compare"]["metadata"]["candidate"][
        "config_sha256"]
    (case,) = rec["cases"]
    (run_case,) = run["cases"]
    assert case["name"] == CASE == run_case["name"]
    assert [(s["name"], s["class"], s["max_abs"], s["mismatched"], s["max_ulp"]) for s in case["stages"]] == [
        (s["name"], s["class"], s["max_abs"], s["mismatched"], s["max_ulp"]) for s in run_case["stages"]]
    assert case["logits"] == pytest.approx(run_case["logits"]) and case["n_soft_tokens"] == run_case["n_soft_tokens"]
    cmp = rec["compare"]
    assert cmp["compared"] == [s["name"] for s in case["stages"]] and len(cmp["compared"]) == 43
    assert {k: cmp[k] for k in ("missing_in_candidate", "extra_in_candidate", "unknown", "cases_missing_in_candidate",
                                "cases_missing_in_reference", "warnings", "require_all")} == {
        "missing_in_candidate": [], "extra_in_candidate": [], "unknown": [], "cases_missing_in_candidate": [],
        "cases_missing_in_reference": [], "warnings": [], "require_all": False}
    meta = cmp["metadata"]["candidate"]
    assert {k: meta[k] for k in ("schema", "dtype", "side", "mode", "mask_policy", "attn_implementation",
                                 "max_soft_tokens", "version.transformers")} == {
        "schema": run["schema"], "dtype": "float32", "side": "candidate", "mode": "free", "mask_policy": "official",
        "attn_implementation": "eager", "max_soft_tokens": "280",
        "version.transformers": run["versions"]["transformers"]}
    assert out.splitlines()[1].startswith("43 stages compared (in both dumps), 0 missing in the candidate, "
                                          "0 extra in the candidate")
    assert case["compare"]["inputs"]["compared"] == ["input.input_ids", "input.mm_token_type_ids"]
    assert "inputs identical: input.input_ids, input.mm_token_type_ids" in out
    assert {"junit.xml", "report.json", "report.md"} <= {p.name for p in (tmp_path / "rep").iterdir()}
    assert json.loads((tmp_path / "rep" / "report.json").read_text()) == rec
    # the --dump folder alone (both sides in it) is the same comparison
    rc, _, _, rec2 = compare(capfd, tmp_path / "again", case_dir.parent)
    assert rc == 0 and [s["max_abs"] for s in rec2["cases"][0]["stages"]] == [s["max_abs"] for s in case["stages"]]
    assert rec2["cases"][0]["name"] == CASE


def test_a_perturbed_stage_is_named_first(dumped, tmp_path, capfd):
    _, case_dir = dumped
    stage = "layers.1.attn.v"

    def perturb(a):
        a[stage] = a[stage].copy()
        a[stage][0, 5, 0, 3] += 0.05

    cand = edited(case_dir / "candidate.safetensors", tmp_path / "cand.safetensors", perturb)
    rc, out, _, rec = compare(capfd, tmp_path, case_dir / "reference.safetensors", cand)
    assert rc == 1
    assert rec["first_divergence"]["stage"] == stage and failing(rec) == [stage]
    st = next(s for s in rec["cases"][0]["stages"] if s["name"] == stage)
    assert st["mismatched"] == 1 and st["max_abs_index"] == [0, 5, 0, 3] and st["max_abs"] == pytest.approx(0.05, 1e-3)
    assert st["tolerance"] == {"rtol": 1.3e-6, "atol": 2e-3}  # the attention class, fp32 free
    assert f"First divergent stage: {stage} (case {CASE})" in out
    root = ET.parse(tmp_path / "rep" / "junit.xml").getroot()
    assert [tc.get("name") for tc in root.iter("testcase") if tc.find("failure") is not None] == [stage]
    # teacher-forced tolerances are tighter: the same dumps, more failures
    rc, _, _, rec = compare(capfd, tmp_path / "teacher", case_dir / "reference.safetensors", cand, "--mode", "teacher")
    tight = tolerance("attention", "float32", "teacher")
    assert rc == 1 and rec["settings"]["mode"] == "teacher" and len(failing(rec)) > 1
    assert next(s for s in rec["cases"][0]["stages"] if s["name"] == stage)["tolerance"]["atol"] == tight.atol


def test_renamed_key_is_listed_apart(dumped, tmp_path, capfd):
    _, case_dir = dumped
    cand = edited(case_dir / "candidate.safetensors", tmp_path / "cand.safetensors",
                  lambda a: a.__setitem__("layers.0.attn.query", a.pop("layers.0.attn.q")))
    rc, out, _, rec = compare(capfd, tmp_path, case_dir / "reference.safetensors", cand)
    assert rc == 0 and rec["first_divergence"] is None  # in one dump only: listed, neither compared nor failed
    cmp = rec["compare"]
    assert cmp["unknown"] == ["layers.0.attn.query"] and len(cmp["compared"]) == 42
    assert cmp["missing_in_candidate"] == ["layers.0.attn.q"] and cmp["extra_in_candidate"] == ["layers.0.attn.query"]
    assert {"layers.0.attn.q", "layers.0.attn.query"}.isdisjoint(s["name"] for s in rec["cases"][0]["stages"])
    assert "unknown stage names (1): layers.0.attn.query" in out
    assert "stages missing in the candidate (1): layers.0.attn.q" in out
    assert "stages extra in the candidate (1): layers.0.attn.query" in out
    assert "42 stages compared (in both dumps), 1 missing in the candidate, 1 extra in the candidate" in out
    # --require-all: each of them fails, known ones in forward order, unknown last
    rc, out, _, rec = compare(capfd, tmp_path / "all", case_dir / "reference.safetensors", cand, "--require-all")
    assert rc == 1 and rec["compare"]["require_all"]
    assert failing(rec) == ["layers.0.attn.q", "layers.0.attn.query"]
    stages = {s["name"]: s for s in rec["cases"][0]["stages"]}
    assert stages["layers.0.attn.q"]["error"] == "Stage missing on the candidate side"
    assert stages["layers.0.attn.query"]["class"] == "unknown"
    assert "in the candidate dump only" in stages["layers.0.attn.query"]["error"]
    assert rec["first_divergence"]["stage"] == "layers.0.attn.q"
    assert "(--require-all: each fails)" in out.splitlines()[1]
    # --stages narrows what is compared (and, with --require-all, required)
    rc, _, _, rec = compare(capfd, tmp_path / "narrow", case_dir / "reference.safetensors", cand,
                            "--stages", "vision.*", "--stages", "image.*", "--require-all")
    assert rc == 0 and [s["name"] for s in rec["cases"][0]["stages"]][:2] == ["image.pixel_values",
                                                                               "image.position_ids"]
    assert len(rec["cases"][0]["stages"]) == 9 and rec["settings"]["stages"] == ["vision.*", "image.*"]
    rc, out, err = cli(capfd, "compare", case_dir / "reference.safetensors", cand, "--stages", "nope.*",
                       "--report-dir", tmp_path / "none")
    assert rc == 2 and "matches no stage" in err and not (tmp_path / "none").exists()


def test_partial_dump_diverges_where_it_differs(dumped, tmp_path, capfd):
    """A port that writes a few stages: the missing ones are listed apart, the first divergence is the
    first compared stage that fails, and a dump with no stage in common is bad input."""
    _, case_dir = dumped
    kept = ("text.inputs_embeds", "mask.full_attention", "mask.sliding_attention", "layers.2.out", "logits")

    def partial(a, perturb=False):
        for k in [k for k in a if not k.startswith("input.") and k not in kept]:
            del a[k]
        if perturb:
            a["layers.2.out"] = a["layers.2.out"] * np.float32(1.01)

    ref = case_dir / "reference.safetensors"
    ok = edited(case_dir / "candidate.safetensors", tmp_path / "ok.safetensors", partial)
    rc, out, _, rec = compare(capfd, tmp_path / "ok", ref, ok)
    assert rc == 0 and rec["passed"] and rec["compare"]["compared"] == list(kept)
    assert len(rec["compare"]["missing_in_candidate"]) == 38 and not rec["compare"]["extra_in_candidate"]
    assert [s["name"] for s in rec["cases"][0]["stages"]] == list(kept)
    assert out.splitlines()[1].startswith("5 stages compared (in both dumps), 38 missing in the candidate")
    md = (tmp_path / "ok" / "rep" / "report.md").read_text()
    assert "5 stages compared (in both dumps), 38 missing in the candidate" in md.splitlines()[2]
    assert "- stages missing in the candidate (38): `image.pixel_values`, " in md
    assert "| layers.1.out |" not in md and "| vision.patch_ln1 |" not in md  # never a row of the table
    bad = edited(case_dir / "candidate.safetensors", tmp_path / "bad.safetensors", lambda a: partial(a, True))
    rc, out, _, rec = compare(capfd, tmp_path / "bad", ref, bad)
    assert rc == 1 and rec["first_divergence"]["stage"] == "layers.2.out"
    assert failing(rec) == ["layers.2.out"]
    assert "First divergent stage: layers.2.out" in out
    none = edited(case_dir / "candidate.safetensors", tmp_path / "none.safetensors",
                  lambda a: [a.pop(k) for k in list(a) if not k.startswith("input.")])
    rc, out, err, _ = compare(capfd, tmp_path / "none", ref, none)
    assert_refused(rc, out, err, tmp_path / "none", f"{none}: no stage in common with {ref}")


def test_metadata_is_shown_not_invented(dumped, tmp_path, capfd):
    """The header states what the dumps' metadata says; dumps that disagree on the dtype or the
    checkpoint's config digest get a warning, not an error."""
    _, case_dir = dumped
    meta = {"dtype": "float32", "mode": "teacher", "mask_policy": "official", "max_soft_tokens": "280",
            "attn_implementation": "eager", "config_sha256": "a" * 64}
    other = {"dtype": "bfloat16", "config_sha256": "b" * 64, "mask_policy": "hf-forward"}
    for side, extra in (("reference", {}), ("candidate", other)):
        save_file(load_file(str(case_dir / f"{side}.safetensors")), str(tmp_path / f"{side}.safetensors"),
                  metadata=meta | extra)
    rc, out, err, rec = compare(capfd, tmp_path / "m", tmp_path)
    assert rc == 1  # the teacher-forced table, from the metadata, is tighter than these free-running dumps
    s = rec["settings"]
    assert (s["mode"], s["max_soft_tokens"], s["mask_policy"], s["candidate_mask_policy"],
            s["attn_implementation"]) == ("teacher", 280, "official", "hf-forward", "eager")
    assert out.splitlines()[0].endswith("(mode teacher, dtype float32, max_soft_tokens 280, mask policy official, "
                                        "attention eager, candidate mask policy hf-forward)")
    assert s["dtype"] == "float32"  # the reference's
    warnings = rec["compare"]["warnings"]
    assert [w.split(":")[0] for w in warnings] == ["the dumps' metadata disagree on dtype",
                                                   "the dumps' metadata disagree on config_sha256"]
    assert warnings[0] == (f"the dumps' metadata disagree on dtype: 'float32' in {tmp_path / 'reference.safetensors'}, "
                           f"'bfloat16' in {tmp_path / 'candidate.safetensors'}")
    assert err.splitlines() == [f"rmlx-parity: warning: {w}" for w in warnings]
    md = (tmp_path / "m" / "rep" / "report.md").read_text()
    assert all(f"**warning:** {w}" in md for w in warnings) and "| config_sha256 | aaaa" in md
    assert rec["cases"][0]["mask_policy"] == "official" and rec["cases"][0]["max_soft_tokens"] == 280
    rc, _, err, rec = compare(capfd, tmp_path / "free", tmp_path, None, "--mode", "free")
    assert rc == 0 and rec["settings"]["mode"] == "free" and "config_sha256" in err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "absent"])
def test_unreadable_dump_is_refused(dumped, tmp_path, capfd, damage):
    _, case_dir = dumped
    bad = tmp_path / "bad.safetensors"
    data = (case_dir / "candidate.safetensors").read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + data[100:200])
    rc, out, err, _ = compare(capfd, tmp_path, case_dir / "reference.safetensors", bad)
    assert_refused(rc, out, err, tmp_path, str(bad))


def test_dumps_of_different_inputs_are_refused(dumped, tmp_path, capfd):
    _, case_dir = dumped

    def other_token(a):
        a["input.input_ids"] = a["input.input_ids"].copy()
        a["input.input_ids"][0, 2] += 1

    cand = edited(case_dir / "candidate.safetensors", tmp_path / "cand.safetensors", other_token)
    rc, out, err, _ = compare(capfd, tmp_path, case_dir / "reference.safetensors", cand)
    assert_refused(rc, out, err, tmp_path, "the dumps are of different inputs: input.input_ids differs at index (0, 2)",
                   "1 of 273 elements differ")
    # an input present in one dump only is listed, not refused (a port may not write its inputs)
    cand = edited(case_dir / "candidate.safetensors", tmp_path / "noinputs.safetensors",
                  lambda a: a.pop("input.mm_token_type_ids"))
    rc, out, _, rec = compare(capfd, tmp_path / "one-side", case_dir / "reference.safetensors", cand)
    assert rc == 0 and rec["cases"][0]["compare"]["inputs"]["only_in_reference"] == ["input.mm_token_type_ids"]
    assert "input.mm_token_type_ids only in the reference" in out


def test_bf16_dumps_round_trip(dumped, tmp_path, capfd):
    """bf16 tensors (no dtype metadata) load exactly, select the bf16 tolerances, and compare as bf16."""
    _, case_dir = dumped
    sides = {}
    for side in ("reference", "candidate"):
        arrays = {k: (v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 and not k.startswith("input.") else v)
                  for k, v in load_file(str(case_dir / f"{side}.safetensors")).items()}
        save_file(arrays, str(tmp_path / f"{side}.safetensors"))  # no metadata: the dtype comes from the tensors
        sides[side] = arrays
    assert load_file(str(tmp_path / "candidate.safetensors"))["logits"].dtype == ml_dtypes.bfloat16
    rc, _, err, rec = compare(capfd, tmp_path / "bf16", tmp_path / "reference.safetensors",
                              tmp_path / "candidate.safetensors")
    assert rc == 0, err
    assert rec["settings"]["dtype"] == "bfloat16"
    assert rec["cases"][0]["compare"]["stored_dtypes"]["candidate"] == ["bfloat16", "bool", "int64"]
    stages = {s["name"]: s for s in rec["cases"][0]["stages"]}
    for name in ("vision.patch_ln1", "layers.3.out", "logits"):
        a, e = (sides[s][name].astype(np.float64) for s in ("candidate", "reference"))
        assert stages[name]["max_abs"] == float(np.abs(a - e).max())
        assert stages[name]["tolerance"] == {"rtol": tolerance(stages[name]["class"], "bfloat16").rtol,
                                             "atol": tolerance(stages[name]["class"], "bfloat16").atol}
    # identical fp32 values round to identical bf16 ones: 0 ULPs, as the exact stages require
    assert [(stages[n]["max_abs"], stages[n]["max_ulp"], stages[n]["passed"]) for n in (
        "image.pixel_values", "text.embed_tokens", "mask.full_attention")] == [(0.0, 0, True)] * 3
    # --dtype overrides: bf16-rounded values are far outside the fp32 tolerances
    rc, _, _, rec = compare(capfd, tmp_path / "fp32", tmp_path / "reference.safetensors",
                            tmp_path / "candidate.safetensors", "--dtype", "float32")
    assert rc == 1 and rec["settings"]["dtype"] == "float32" and failing(rec)


def test_a_fresh_process_reads_a_bf16_dump(tmp_path):
    """`compare` and the pytest plugin read a bf16 dump in a process that has not imported ml_dtypes
    (the metrics do not import it: its import costs ~0.7 s); safetensors.numpy needs NumPy's bfloat16."""
    path = tmp_path / "bf16.safetensors"
    save_file({"logits": np.linspace(-1, 1, 8, dtype=np.float32).astype(ml_dtypes.bfloat16)}, str(path))
    code = ("import sys; from pathlib import Path; assert 'ml_dtypes' not in sys.modules\n"
            "from parity.compare import load_dump; from parity.pytest_plugin import _capture\n"
            f"d = load_dump(Path({str(path)!r})); c = _capture({str(path)!r}, 'candidate')\n"
            "print(d.dtypes['logits'], d.stages['logits'].dtype, c['logits'].dtype)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["bfloat16", "float32", "bfloat16"]


def test_dtype_from_metadata(dumped, tmp_path, capfd):
    """A bf16 run's dumps hold float32 tensors (bf16 widened exactly) and say "bfloat16" in their
    metadata: the metadata decides. A dtype without tolerances is refused."""
    _, case_dir = dumped
    for dtype in ("bfloat16", "float16"):
        (tmp_path / dtype).mkdir()
        for side in ("reference", "candidate"):
            arrays = load_file(str(case_dir / f"{side}.safetensors"))
            save_file(arrays, str(tmp_path / dtype / f"{side}.safetensors"), metadata={"dtype": dtype})
    rc, _, err, rec = compare(capfd, tmp_path / "bf", tmp_path / "bfloat16")
    assert rc == 0, err
    assert rec["settings"]["dtype"] == "bfloat16" and rec["cases"][0]["stages"][2]["tolerance"]["atol"] == 2e-2
    assert rec["cases"][0]["compare"]["stored_dtypes"]["reference"] == ["bool", "float32", "int64"]
    rc, out, err, _ = compare(capfd, tmp_path / "f16", tmp_path / "float16")
    assert_refused(rc, out, err, tmp_path / "f16", "metadata dtype 'float16' has no tolerances", "--dtype")


def test_folders_pair_cases_and_list_the_unpaired(dumped, tmp_path, capfd):
    """REF in the run --dump layout, CAND flat (<case>.safetensors); a case in REF only fails, listed."""
    _, case_dir = dumped
    ref_dir, cand_dir = tmp_path / "ref", tmp_path / "cand"
    for name in (case_dir.name, "tiny__image__copy"):
        shutil.copytree(case_dir, ref_dir / name)
    cand_dir.mkdir()
    shutil.copy(case_dir / "candidate.safetensors", cand_dir / f"{case_dir.name}.safetensors")
    rc, out, _, rec = compare(capfd, tmp_path, ref_dir, cand_dir)
    assert rc == 1 and [c["name"] for c in rec["cases"]] == [CASE] and rec["cases"][0]["passed"]
    assert rec["compare"]["cases_missing_in_candidate"] == ["tiny/image/copy"]
    assert "cases missing in the candidate (1): tiny/image/copy" in out
    root = ET.parse(tmp_path / "rep" / "junit.xml").getroot()
    missing = [tc for tc in root.iter("testcase") if tc.find("failure") is not None]
    assert [(tc.get("classname"), tc.get("name")) for tc in missing] == [("compare", "tiny/image/copy")]
    assert root.get("failures") == "1"
    rc, out, err = cli(capfd, "compare", ref_dir, case_dir / "candidate.safetensors", "--report-dir", tmp_path / "x")
    assert rc == 2 and "not one of each" in err
    rc, out, err = cli(capfd, "compare", case_dir / "candidate.safetensors", "--report-dir", tmp_path / "x")
    assert rc == 2 and "needs a second one" in err and not (tmp_path / "x").exists()
