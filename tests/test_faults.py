"""Planting defects: the CLI flag, the environment variable, the patches; a loader defect
refused with the tensor named; a candidate-only mask policy named at the mask. Every catalogued
defect, in both modes, is tests/test_selftest.py."""

import json
import pathlib
import re

import pytest

from parity.adapters.gemma4_unified.defects import CATALOG, expected_stage
from parity.cli import main
from parity.defects import check, matches, planted
from rmlx.errors import InputError
from rmlx.models.gemma4_unified.config import ModelArgs
from rmlx.nn import base, text
from tests.conftest import ALL_MODELS, MODELS


def first_full_layer(model) -> int:
    return json.loads((model / "config.json").read_text())["text_config"]["layer_types"].index("full_attention")


def test_every_defect_through_the_cli_flag(tmp_path):
    """The self-test (tests/test_selftest.py) plants every defect in-process; here one goes through
    `run --inject`, both modes, on every fixture model, and is named at its stage in each failing case."""
    for mode in ("teacher", "free"):
        args = ["run", "--inject", "rope-partial-slice", "--mode", mode, "--case", "text-only", "--no-oracle",
                "--decode-steps", "1", "--report-dir", str(tmp_path / mode), "--json", str(tmp_path / f"{mode}.json")]
        assert main(args) == 1
        rec = json.loads((tmp_path / f"{mode}.json").read_text())
        assert rec["settings"]["inject"] == ["rope-partial-slice"]
        for case in rec["cases"]:
            model = next(m for m in ALL_MODELS if m.name == case["model"])  # the shared decoder: both families
            assert case["first_divergence"]["stage"] == f"layers.{first_full_layer(model)}.attn.q"
    assert base._rotate.__name__ == "_rotate"  # unplanted again after the run


def test_planted_defects_are_scoped_and_validated():
    """A defect patches the port only inside its block; nested plants stack and unwind."""
    block_ids, head, rotate = base.block_ids, text.TextModel.head, base._rotate
    with planted(check(CATALOG, ["softcap-skipped", "vision-causal"])):
        assert base.block_ids is not block_ids and text.TextModel.head is not head
        with planted(check(CATALOG, ["rope-interleaved"])):
            assert base._rotate is not rotate
        assert base._rotate is rotate
    assert base.block_ids is block_ids and text.TextModel.head is head
    with pytest.raises(InputError, match="unknown defect"):
        check(CATALOG, ["no-such-bug"])


def test_the_port_ships_clean():
    """No fault switch in the code users run: no module of rmlx names a defect or reads RMLX_INJECT."""
    import rmlx

    root = pathlib.Path(rmlx.__file__).parent
    for path in root.rglob("*.py"):
        source = path.read_text()
        assert "RMLX_INJECT" not in source and not re.search(r"\bfaults?\b", source), path
        for name in CATALOG:
            assert f'"{name}"' not in source, (path, name)


def test_fault_stages_resolve_per_case():
    mx, rope = CATALOG["mx-e5m2"], CATALOG["rope-partial-slice"]
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
    assert expected_stage(mx, layer_types, ["text.embed_tokens", "layers.0.attn.o_proj.weight",
                                                   "layers.0.attn.q"]) == "layers.0.attn.o_proj.weight"
    assert expected_stage(mx, layer_types, ["image.pixel_values", "vision.patch_dense.weight",
                                                   "layers.0.attn.q_proj.weight"]) == "vision.patch_dense.weight"
    assert expected_stage(rope, layer_types, []) == "layers.2.attn.q"
    assert matches("logits@decode.2", CATALOG["sliding-cache-off-by-one"].stage)
    assert not matches("logits", CATALOG["sliding-cache-off-by-one"].stage)


def test_k_eq_v_ignored_fails_at_load_naming_the_tensor(tmp_path, capsys):
    variant = next(m for m in MODELS if ModelArgs.from_file(m / "config.json").text.attention_k_eq_v)
    code = main(["run", "--inject", "k-eq-v-ignored", "--model", str(variant), "--case", "text-only",
                 "--report-dir", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert code == 2 and f"layers.{first_full_layer(variant)}.self_attn.v_proj.weight" in err
    assert not (tmp_path / "rep").exists()


def test_candidate_policy_switch_is_named_at_the_full_mask(tmp_path):
    """Reference stays `official`, only the candidate switches: the first divergence is the mask."""
    code = main(["run", "--candidate-mask-policy", "hf-forward", "--case", "image/gradient", "--no-oracle",
                 "--report-dir", str(tmp_path / "rep"), "--json", str(tmp_path / "r.json")])
    rec = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and rec["first_divergence"]["stage"] == "mask.full_attention"
    assert {c["candidate_mask_policy"] for c in rec["cases"]} == {"hf-forward"}


def test_env_var_switch(tmp_path, monkeypatch, capsys):
    """RMLX_INJECT, read by the CLI when it runs (in this process: the read is the same in a fresh one)."""
    monkeypatch.setenv("RMLX_INJECT", "posemb-xy-swap")
    assert main(["run", "--model", str(MODELS[0]), "--case", "image/gradient", "--report-dir", str(tmp_path / "rep"),
                 "--json", str(tmp_path / "r.json"), "--no-oracle"]) == 1
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["first_divergence"]["stage"] == "vision.pos_embed"
    assert "First divergent stage: vision.pos_embed" in capsys.readouterr().out
    assert rec["settings"]["inject"] == ["posemb-xy-swap"]
