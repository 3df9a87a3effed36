"""The pytest plugin (entry point ``pytest11: rmlx``): cheap import, auto-loading, the fixtures, and
``assert_parity`` on a real capture pair (one ``rmlx-parity run --dump`` of the tiny model)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from parity.cli import default_models, main
from parity.pytest_plugin import assert_parity

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
CASE = "tiny__image__gradient"


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> Path:
    """One real capture pair: the tiny model on the gradient image, prefill only, no oracle."""
    tmp = tmp_path_factory.mktemp("plugin")
    code = main(["run", "--model", str(ROOT / "fixtures/models/tiny"), "--case", "image/gradient",
                 "--dump", str(tmp / "d"), "--report-dir", str(tmp / "r"), "--no-oracle", "--decode-steps", "0"])
    assert code == 0
    return tmp / "d" / CASE


@pytest.fixture(scope="module")
def pair(dump) -> tuple[dict, dict]:
    """(candidate, reference); tests build new dicts and arrays, never write into these."""
    return load_file(dump / "candidate.safetensors"), load_file(dump / "reference.safetensors")


def _failure(candidate, reference, *args, **kw) -> str:
    with pytest.raises(AssertionError) as info:
        assert_parity(candidate, reference, *args, **kw)
    return str(info.value)


# --------------------------------------------------------------------------------- loading and fixtures


def test_import_does_not_load_torch_or_mlx():
    code = ("import sys, parity, parity.pytest_plugin; from parity import assert_parity; "
            "heavy = [m for m in ('torch', 'transformers', 'mlx', 'mlx.core') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_entry_point_autoloads_in_a_fresh_project(pytester):
    assert any(ep.value == "parity.pytest_plugin" for ep in entry_points(group="pytest11", name="rmlx"))
    pytester.makepyfile(test_uses="""
        def test_fixtures(rmlx_fixtures_dir, rmlx_models, rmlx_battery):
            assert rmlx_fixtures_dir.is_dir()
            assert rmlx_models and all((m / "config.json").is_file() for m in rmlx_models)
            assert rmlx_battery and all(p.suffix == ".png" and p.is_file() for p in rmlx_battery)

        def test_assert_parity_importable():
            from parity import assert_parity as a
            from parity.pytest_plugin import assert_parity as b
            assert a is b
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--trace-config")
    result.stdout.fnmatch_lines(["*PLUGIN registered: <module 'parity.pytest_plugin'*",
                                 "*rmlx-0.1.0 at *", "*2 passed*"])
    assert result.ret == 0


def test_fixtures_are_the_embedded_default(rmlx_fixtures_dir, rmlx_models, rmlx_battery):
    assert rmlx_fixtures_dir == ROOT / "fixtures"
    assert rmlx_models == sorted(p for p in (ROOT / "fixtures/models").iterdir() if (p / "config.json").is_file())
    assert all((m / "model.safetensors").is_file() for m in rmlx_models)
    assert rmlx_battery == sorted((ROOT / "fixtures/images").glob("*.png"))
    assert (ROOT / "fixtures/images/gradient.png") in rmlx_battery
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in rmlx_battery)


def test_fixtures_follow_rmlx_fixtures_and_fail_clearly_when_empty(pytester, monkeypatch):
    root = pytester.mkdir("fx")
    (root / "models" / "m1").mkdir(parents=True)
    (root / "models" / "m1" / "config.json").write_text("{}")
    (root / "models" / "not-a-model").mkdir()
    (root / "images").mkdir()
    (root / "images" / "a.png").write_bytes(b"")
    (root / "images" / "b.jpg").write_bytes(b"")
    pytester.makepyfile(test_env=f"""
        from pathlib import Path

        def test_models(rmlx_fixtures_dir, rmlx_models, rmlx_battery):
            assert rmlx_fixtures_dir == Path({str(root)!r})
            assert [m.name for m in rmlx_models] == ["m1"]
            assert [p.name for p in rmlx_battery] == ["a.png"]
    """)
    monkeypatch.setenv("RMLX_FIXTURES", str(root))
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    monkeypatch.setenv("RMLX_FIXTURES", str(pytester.mkdir("empty")))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no fixture models under *empty. Note: set RMLX_FIXTURES*"])
    pytester.makepyfile(test_one="""
        def test_one(rmlx_model):
            pass
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "test_one.py")
    result.assert_outcomes(errors=1)  # a collection error, never an empty (skipped) parametrization
    result.stdout.fnmatch_lines(["*test_one.py::test_one asks for 'rmlx_model' but there are no fixture models*"])
    monkeypatch.setenv("RMLX_FIXTURES", str(root / "missing"))
    result = pytester.runpytest("-p", "no:cacheprovider", "test_env.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*rmlx fixtures folder *missing does not exist*"])


def test_rmlx_model_and_rmlx_image_parametrize_only_who_asks(pytester):
    pytester.makepyfile(test_params="""
        import pytest

        @pytest.fixture(scope="session")
        def loaded(rmlx_model):
            with open("loads.txt", "a") as f:
                f.write(rmlx_model.name + "\\n")
            return rmlx_model.name

        def test_model(rmlx_model):
            assert (rmlx_model / "config.json").is_file()

        def test_image(rmlx_image):
            assert rmlx_image.suffix == ".png"

        def test_through_a_fixture(loaded, rmlx_image):
            pass

        @pytest.mark.parametrize("rmlx_model", ["mine"])
        def test_own_values(rmlx_model):
            assert rmlx_model == "mine"

        def test_untouched():
            pass

        def test_dynamic(request):
            request.getfixturevalue("rmlx_model")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "-v")
    models = [m.name for m in default_models()]
    n = len(models)
    k = len(list((ROOT / "fixtures" / "images").glob("*.png")))
    result.assert_outcomes(passed=n + k + n * k + 1 + 1, failed=1)  # models, images, both, own, untouched
    result.stdout.fnmatch_lines(["*'rmlx_model' is parametrized at collection: request it as a test or fixture*"])
    result.stdout.fnmatch_lines(["*test_model?tiny? PASSED*", "*test_model?tiny-variant? PASSED*",
                                 "*test_image?gradient? PASSED*", "*test_own_values?mine? PASSED*",
                                 "*test_untouched PASSED*"])
    assert set((pytester.path / "loads.txt").read_text().split()) == set(models)  # a session fixture per model


def test_a_conftest_fixture_of_the_same_name_wins(pytester):
    pytester.makeconftest("""
        import pytest

        @pytest.fixture
        def rmlx_model():
            return "only-this-one"
    """)
    pytester.makepyfile(test_override="""
        def test_model(rmlx_model):
            assert rmlx_model == "only-this-one"
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


# ------------------------------------------------------------------------------------------ assert_parity


def test_real_pair_passes_every_stage_in_forward_order(pair):
    cand, ref = pair
    diffs = assert_parity(cand, ref)
    names = [d.stage for d in diffs]
    assert set(names) == {k for k in ref if not k.startswith("input.")}  # inputs are not stages
    assert names[:3] == ["image.pixel_values", "image.position_ids", "vision.patch_ln1"]
    assert names[-2:] == ["text.norm", "logits"]
    assert names.index("mask.sliding_attention") < names.index("layers.0.input_layernorm")
    layer_of = [int(n.split(".")[1]) for n in names if n.startswith("layers.")]
    assert layer_of == sorted(layer_of) and layer_of[-1] == 3
    assert all(d.passed for d in diffs)


def test_perturbed_pair_names_the_first_divergent_stage(pair):
    import torch

    cand, ref = pair
    bad = dict(cand)
    bad["layers.3.out"] = cand["layers.3.out"] + 1  # later in forward order, first in the dict
    bad["vision.patch_ln2"] = cand["vision.patch_ln2"] * np.float32(1.01)
    bad["text.embed_tokens"] = cand["text.embed_tokens"] + np.float32(1e-3)
    msg = _failure({k: bad[k] for k in sorted(bad, reverse=True)}, ref)
    lines = msg.splitlines()
    n = sum(not k.startswith("input.") for k in ref)
    assert lines[0] == (f"First divergent stage: 'vision.patch_ln2' (3 of {n} stages failed: "
                        "vision.patch_ln2, text.embed_tokens, layers.3.out)")
    assert lines[1] == "" and lines[2] == "Stage 'vision.patch_ln2' is not close!"
    assert lines[4].startswith("Mismatched elements: ")
    assert lines[5].startswith("Greatest absolute difference: ") and "(up to 0.0002 allowed)" in lines[5]
    assert lines[6].startswith("Greatest relative difference: ") and "(up to 1.3e-06 allowed)" in lines[6]
    # the mismatch count is torch.testing.assert_close's own, line for line
    with pytest.raises(AssertionError) as torch_err:
        torch.testing.assert_close(torch.from_numpy(bad["vision.patch_ln2"]), torch.from_numpy(ref["vision.patch_ln2"]),
                                   rtol=1.3e-6, atol=2e-4)
    torch_lines = str(torch_err.value).splitlines()
    assert torch_lines[0] == "Tensor-likes are not close!" and torch_lines[2] == lines[4]
    assert "Failed stages, in forward order:" in msg and "  layers.3.out" in msg


def test_missing_stages_fail_on_either_side_and_are_listed(pair):
    cand, ref = pair
    cand = {k: v for k, v in cand.items() if k != "layers.2.mlp.out"}
    ref = {k: v for k, v in ref.items() if k != "vision.pos_norm"}
    msg = _failure(cand, ref)
    assert msg.splitlines()[0].startswith("First divergent stage: 'vision.pos_norm' (2 of ")
    assert "Stage missing on the reference side" in msg
    assert "Missing in candidate: ['layers.2.mlp.out']; missing in reference: ['vision.pos_norm']" in msg
    # a stage named explicitly must exist
    msg = _failure(cand, ref, stages=["logits", "layers.9.out"])
    assert "First divergent stage: 'layers.9.out' (1 of 2 stages failed" in msg
    assert "Stage missing on the candidate and reference side" in msg


def test_unknown_stages_need_an_explicit_tolerance(pair):
    cand, ref = pair
    cand = {**cand, "myport.extra": np.ones(4, np.float32)}
    ref = {**ref, "myport.extra": np.ones(4, np.float32) + 1e-6}
    with pytest.raises(ValueError, match=r"no tolerance class for stage\(s\) \['myport.extra'\].*tolerances="):
        assert_parity(cand, ref)
    diffs = assert_parity(cand, ref, tolerances={"myport.extra": (0.0, 1e-5)})
    assert diffs[-1].stage == "myport.extra"  # names the table does not know come after it
    msg = _failure(cand, ref, tolerances={"myport.*": {"rtol": 0.0, "atol": 1e-7}})
    assert msg.startswith("First divergent stage: 'myport.extra'")
    with pytest.raises(ValueError, match="both required"):
        assert_parity(cand, ref, tolerances={"myport.extra": 1e-5})


def test_stage_selection_and_inputs(pair):
    cand, ref = pair
    assert [d.stage for d in assert_parity(cand, ref, "vision.patch_*")] == [
        "vision.patch_ln1", "vision.patch_dense", "vision.patch_ln2"]
    with pytest.raises(ValueError, match="'vison.*' matches no stage"):
        assert_parity(cand, ref, ["vison.*"])
    shifted = {**cand, "input.input_ids": cand["input.input_ids"] + 1}
    assert "input.input_ids" not in {d.stage for d in assert_parity(shifted, ref)}  # ignored unless named
    msg = _failure(shifted, ref, stages=["input.*"])
    assert msg.startswith("First divergent stage: 'input.input_ids' (1 of 2 stages failed")
    assert "(up to 0 allowed)" in msg  # inputs compare exactly


def test_dtype_and_mode_pick_the_named_tolerances(pair):
    cand, ref = pair
    bad = {**cand, "vision.patch_ln2": cand["vision.patch_ln2"] * np.float32(1.01)}
    assert assert_parity(bad, ref, "vision.patch_ln2", dtype="bfloat16")[0].tolerance.rtol == 1.6e-2
    # a free-running capture drifts past the teacher-forced decoder bound (2e-5) but not the free one
    assert_parity(cand, ref, "layers.**")
    assert _failure(cand, ref, "layers.**", mode="teacher").startswith("First divergent stage: 'layers.")
    with pytest.raises(ValueError, match="mode must be one of"):
        assert_parity(cand, ref, mode="teacher-forced")
    with pytest.raises(ValueError, match="dtype must be one of"):
        assert_parity(cand, ref, dtype="fp32")


def test_tensors_and_dump_paths_are_accepted(pair, dump):
    import mlx.core as mx
    import torch

    cand, ref = pair
    names = ["vision.patch_ln1", "mask.full_attention", "logits"]
    as_mx = {k: mx.array(cand[k]) for k in names}
    as_torch = {k: torch.from_numpy(ref[k]).requires_grad_(ref[k].dtype == np.float32) for k in names}
    assert len(assert_parity(as_mx, as_torch)) == 3
    bf = {"logits": mx.array(ref["logits"]).astype(mx.bfloat16)}
    tb = {"logits": torch.from_numpy(ref["logits"]).to(torch.bfloat16)}
    assert assert_parity(bf, tb, dtype="bfloat16")[0].max_ulp == 0
    diffs = assert_parity(dump / "candidate.safetensors", dump / "reference.safetensors", "logits")
    assert [d.stage for d in diffs] == ["logits"]
    with pytest.raises(TypeError, match="mapping of stage name"):
        assert_parity([cand["logits"]], ref)


def test_failure_inside_a_users_test_leads_with_the_stage(pytester):
    pytester.makepyfile(test_port="""
        import numpy as np
        from parity import assert_parity

        def test_port():
            ref = {"vision.patch_ln1": np.zeros((2, 3), np.float32), "logits": np.zeros((1, 5), np.float32)}
            cand = {**ref, "logits": np.full((1, 5), 0.5, np.float32)}
            assert_parity(cand, ref)
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E * AssertionError: First divergent stage: 'logits' (1 of 2 stages failed: logits)",
                                 "E * Stage 'logits' is not close!", "E * Mismatched elements: 5 / 5 (100.0%)",
                                 "E * Greatest absolute difference: 0.5 at index (0, 0) (up to 0.002 allowed)"])
    assert "pytest_plugin.py" not in result.stdout.str()  # __tracebackhide__: the user's line is the last frame


def test_importing_the_plugin_has_no_side_effect():
    """Every pytest run of an environment with rmlx installed imports the plugin: it must not load MKL
    or set MKL's threading layer (rmlx/blas.py does that only when the port is imported)."""
    code = ("import os, sys; os.environ.pop('MKL_THREADING_LAYER', None); import parity, parity.pytest_plugin; "
            "assert 'rmlx' not in sys.modules and 'rmlx.blas' not in sys.modules, sorted(sys.modules); "
            "assert 'MKL_THREADING_LAYER' not in os.environ")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
