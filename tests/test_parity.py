"""The embedded default, end to end through the CLI: every fixture model x every scenario (each
battery image, plus text-only, two images, image at the start / end, a long image block, image + audio).

Every stage passes its named tolerance, structural stages and masks are exact, fp32 logits agree on
the top-1 token at every position and decode step, and the JSON record has the documented schema.
"""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from parity.adapters.gemma4 import FAMILY as GEMMA4_FAMILY
from parity.adapters.gemma4_unified.adapter import special_scenarios
from parity.adapters.gemma4_unified.stages import stages_for
from parity.cli import main
from parity.tolerances import tolerance
from rmlx.models.gemma4_unified.config import ModelArgs
from tests.conftest import ALL_MODELS, FIXTURES, GEMMA4_MODELS, IMAGES, MODELS, UNIFIED_MODELS

STAGE_FIELDS = {"name", "passed", "max_abs", "max_abs_index", "max_rel", "mismatched", "numel", "max_ulp",
                "cosine", "nmse_db", "tolerance", "min_tolerance"}
ARGS = {m.name: ModelArgs.from_file(m / "config.json") for m in UNIFIED_MODELS}


GEMMA4 = {m.name for m in GEMMA4_MODELS}  # the gemma4 (SigLIP vision) fixture models: no audio tower


def expected_cases() -> int:
    specials = special_scenarios(FIXTURES / "images")
    return (sum(len(IMAGES) + sum(1 for s in specials if not s.has_audio or ARGS[m.name].audio) for m in UNIFIED_MODELS)
            + sum(len(IMAGES) + sum(1 for s in specials if not s.has_audio) for _ in GEMMA4_MODELS))


def want_stages(case: dict) -> list[str]:
    if case["model"] in GEMMA4:
        model = next(m for m in GEMMA4_MODELS if m.name == case["model"])
        table = GEMMA4_FAMILY.stage_table(model)
        return [s.name for s in table if case["image_sizes"] or not s.name.startswith(("image.", "vision."))]
    return [s.name for s in stages_for(ARGS[case["model"]].text, bool(case["image_sizes"]), case["audio"])]


# the default test run: fp32 free-running (the gate's run); every other combination: `nox -s slow`
RUNS = [("float32", "free", "official"),
        pytest.param(("float32", "teacher", "official"), marks=pytest.mark.slow),
        pytest.param(("bfloat16", "free", "official"), marks=pytest.mark.slow),
        pytest.param(("float32", "free", "hf-forward"), marks=pytest.mark.slow),
        pytest.param(("float32", "teacher", "hf-forward"), marks=pytest.mark.slow),
        pytest.param(("bfloat16", "teacher", "official"), marks=pytest.mark.slow),
        pytest.param(("bfloat16", "free", "hf-forward"), marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=RUNS, ids=lambda p: "-".join(p))
def default_run(request, default_runs):
    return default_runs(*request.param)


def test_default_run_passes(default_run):
    code, rec, _ = default_run
    failing = [(c["name"], c["first_divergence"]) for c in rec["cases"] if not c["passed"]]
    assert code == 0 and rec["passed"] and rec["first_divergence"] is None, failing[:3]
    assert len(rec["cases"]) == expected_cases()


def test_record_schema(default_run):
    _, rec, out = default_run
    assert rec["schema"] == "rmlx.parity/2"
    assert {"transformers", "torch", "mlx", "numpy"} <= set(rec["versions"])
    assert rec["wall_time_s"] > 0 and rec["command"].startswith("rmlx-parity run --dtype")
    for case in rec["cases"]:
        assert {"name", "model", "image", "dtype", "mode", "stages", "mask_policy",
                "reference_self_consistency", "logits", "decode"} <= set(case)
        assert [s["name"] for s in case["stages"]] == want_stages(case)
        for st in case["stages"]:
            assert STAGE_FIELDS <= set(st), STAGE_FIELDS - set(st)
        assert [d["step"] for d in case["decode"]] == [1, 2, 3, 4]
    md = (out / "rep" / "report.md").read_text()
    assert "wall time" in md and "logits" in md


def test_structural_stages_and_masks_are_exact(default_run):
    _, rec, _ = default_run
    for case in rec["cases"]:
        for st in case["stages"]:
            if st["class"] in ("exact", "mask"):
                assert st["max_abs"] == 0 and st["mismatched"] == 0, (case["name"], st["name"])


def test_numeric_stages_use_the_named_tolerance(default_run):
    _, rec, _ = default_run
    for case in rec["cases"]:
        for st in case["stages"]:
            tol = tolerance(st["class"], case["dtype"], case["mode"])
            assert st["tolerance"] == {"rtol": tol.rtol, "atol": tol.atol}


def test_logits_agree_on_the_next_token(default_run):
    """fp32: 100 % top-1 agreement at every prefill position and decode step. bf16 logits tie and
    flip within an ulp; there the agreement is reported, and held above the measured floor
    (prefill 90.9 %, KL max 0.017 over the default, `rmlx-parity run --dtype bfloat16`)."""
    _, rec, _ = default_run
    for case in rec["cases"]:
        if rec["settings"]["dtype"] == "float32":
            assert case["logits"]["top1_agreement"] == 1.0, case["name"]
            assert all(d["top1_agreement"] == 1.0 for d in case["decode"]), case["name"]
        else:
            assert case["logits"]["top1_agreement"] >= 0.85 and case["logits"]["kl_max"] < 0.05, case["name"]


def test_policies_differ_in_the_reference_itself(default_run):
    """Reference self-consistency: under `official`, HF's own forward differs on image cases (the
    two policies disagree whenever an image block is longer than the window); never on text only.
    gemma4 (SigLIP vision) the other way round: HF's own gemma4 forward builds `official`."""
    _, rec, _ = default_run
    every = {c["name"]: c["reference_self_consistency"]["max_abs_logits"] for c in rec["cases"]}
    g4 = {k: v for k, v in every.items() if k.split("/", 1)[0] in GEMMA4}
    sc = {k: v for k, v in every.items() if k not in g4}
    if rec["settings"]["mask_policy"] == "official":
        assert set(g4.values()) <= {0.0}
    else:
        assert all(v == 0.0 for k, v in g4.items() if k.endswith("/text-only"))
        assert all(v > 0.1 for k, v in g4.items() if k.endswith(("/two-images", "/long-image-block")))
    if rec["settings"]["mask_policy"] == "hf-forward":
        assert set(sc.values()) == {0.0}
        return
    assert all(v == 0.0 for k, v in sc.items() if k.endswith("/text-only"))
    assert all(v > 0.1 for k, v in sc.items() if k.endswith(("/two-images", "/long-image-block")))


def test_oracle_agrees_with_both_sides_in_fp32(default_runs):
    """The float64 oracle is the seed of truth: HF and rmlx are both within the fp32 tolerance of it."""
    _, rec, _ = default_runs("float32", "free", "official")
    checked = 0
    for case in rec["cases"]:
        for st in case["stages"]:
            if "oracle" in st:
                assert st["oracle"]["reference_max_abs"] <= st["tolerance"]["atol"], (case["name"], st["name"])
                assert st["oracle"]["candidate_max_abs"] <= st["tolerance"]["atol"], (case["name"], st["name"])
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("mst,every", [(70, False), pytest.param(70, True, marks=pytest.mark.slow),
                                       pytest.param(1120, True, marks=pytest.mark.slow)],
                         ids=["70-tiny-models", "70", "1120"])
def test_default_run_at_other_budgets(mst, every, tmp_path):
    """The smallest and the largest soft-token budgets over the image battery (1120: minutes; it and the
    70-token run of every fixture model are run by `nox -s slow`; the default runs the two families'
    tiny models, and the self-test runs the configuration models at 70). At 1120 the 1200x4 sliver's
    patch positions pass the SigLIP fixture's 1024-entry position table, which that family refuses
    (exit 2): the largest budget runs the unified models."""
    chosen = UNIFIED_MODELS if mst > 280 else ALL_MODELS if every else [m for m in ALL_MODELS
                                                                        if m.name in ("tiny", "gemma4-tiny")]
    models = [a for m in chosen for a in ("--model", str(m))]
    code = main(["run", "--max-soft-tokens", str(mst), "--case", "image/*", *models, "--report-dir",
                 str(tmp_path / "rep"), "--json", str(tmp_path / "r.json")])
    rec = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and rec["passed"], rec["first_divergence"]
    assert {c["model"] for c in rec["cases"]} == {m.name for m in chosen}


def test_dump_has_stage_keys_inputs_and_batch_axis(tmp_path):
    model = MODELS[0]
    code = main(["run", "--model", str(model), "--case", "image-and-audio", "--dump", str(tmp_path / "dump"),
                 "--report-dir", str(tmp_path / "rep"), "--no-oracle", "--attn-implementation", "sdpa"])
    assert code == 0
    folder = tmp_path / "dump" / f"{model.name}__image-and-audio"
    ref = load_file(folder / "reference.safetensors")
    cand = load_file(folder / "candidate.safetensors")
    names = {s.name for s in stages_for(ARGS[model.name].text, True, True)}
    assert names <= set(ref) and names <= set(cand)
    assert {"input.input_ids", "input.mm_token_type_ids", "input.audio_frames"} <= set(ref)
    for n in names:
        assert ref[n].shape == cand[n].shape and ref[n].shape[0] == 1, n
    n_img = int((ref["input.mm_token_type_ids"] == 1).sum())
    assert n_img == ref["vision.soft_tokens"].shape[1]
    np.testing.assert_array_equal(ref["mask.sliding_attention"], cand["mask.sliding_attention"])


def test_existing_report_folder_is_refused(tmp_path, capsys):
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "keep.txt").write_text("mine")
    assert main(["run", "--case", "text-only", "--report-dir", str(tmp_path / "rep")]) == 2
    assert (tmp_path / "rep" / "keep.txt").read_text() == "mine"
    assert "already exists" in capsys.readouterr().err


