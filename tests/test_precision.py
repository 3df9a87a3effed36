"""`rmlx-parity debug precision` on the tiny fixture: it finds a set of modules to keep in full precision
that meets the target (measured again here, independently), and `convert --keep` writes that choice."""

import json

import numpy as np
import pytest

from parity.cli import main
from parity.metrics import logits_agreement
from rmlx.models.gemma4_unified.load import load_model
from tests.conftest import FIXTURES

TINY = FIXTURES / "models" / "tiny"
ARGS = ["debug", "precision", "--quantize", "mxfp8", "--model", str(TINY), "--case", "image/gradient"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision")
    code = main([*ARGS, "--target-kl", "0.01", "--report-dir", str(out / "rep")])
    return code, out, json.loads((out / "rep" / "precision.json").read_text())


def test_finds_a_set_that_meets_the_target(searched):
    code, _, rec = searched
    assert code == 0 and rec["met"]
    assert rec["all_quantized"]["kl_mean"] > 0.01 >= rec["result"]["kl_mean"]  # the target needed a choice
    rows = rec["modules"]
    assert 0 < len(rec["keep"]) < len(rows)  # a small set: not nothing, not everything
    # the most sensitive modules are the ones kept (bisection over the sensitivity order)
    assert [r["kept"] for r in rows] == [True] * len(rec["keep"]) + [False] * (len(rows) - len(rec["keep"]))
    assert [r["alone_kl_mean"] for r in rows] == sorted((r["alone_kl_mean"] for r in rows), reverse=True)
    assert {r["module"] for r in rows if r["kept"]} == set(rec["keep"])


def test_the_chosen_set_measures_as_reported(searched):
    """Load the port with the kept modules in full precision and measure against the unquantized port
    ourselves: the same KL as the record."""
    _, _, rec = searched
    from parity.adapter import family_of
    from parity.runner import Settings
    from rmlx.models.gemma4_unified.image import load_image

    settings = Settings(oracle=False, decode_steps=0)
    adapter = family_of(TINY).load(TINY, settings)
    scenario = next(s for s in family_of(TINY).scenarios([FIXTURES / "images" / "gradient.png"], None))
    decoded = {p: load_image(p) for p in scenario.images}
    inputs = adapter.inputs(scenario, decoded, settings)[0]
    (full,) = adapter.port_logits([(scenario, inputs)], decoded, settings, None)
    (chosen,) = adapter.port_logits([(scenario, inputs)], decoded, settings, "mxfp8", frozenset(rec["keep"]))
    assert logits_agreement(chosen, full)["kl_mean"] == pytest.approx(rec["result"]["kl_mean"], rel=1e-6)


def test_convert_keeps_the_chosen_modules(searched, tmp_path):
    _, out, rec = searched
    assert main(["convert", "--quantize", "mxfp8", "--keep", str(out / "rep" / "keep.json"), str(TINY),
                 str(tmp_path / "q")]) == 0
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    model = load_model(tmp_path / "q")
    kept = {p for p, s in model.quant_status.items() if s != "quantized"}
    assert kept == set(rec["keep"]) and all(q[k] is False for k in q if k not in ("group_size", "bits", "mode"))
    assert np.isfinite(np.array(model.language_model.layers[0].self_attn.q_proj.weight)).all()


def test_a_top1_target(tmp_path):
    assert main([*ARGS, "--target-top1", "0.9", "--report-dir", str(tmp_path / "r")]) == 0
    rec = json.loads((tmp_path / "r" / "precision.json").read_text())
    assert rec["met"] and rec["result"]["top1"] >= 0.9 > rec["all_quantized"]["top1"]


@pytest.mark.parametrize("content,why", [("{", "not readable JSON"), ('{"schema": "x"}', "schema"),
                                         ('{"schema": "rmlx.precision/1", "mode": "mxfp8", "keep": ["nope"]}',
                                          "no quantizable module 'nope'")])
def test_convert_refuses_a_bad_keep_file(tmp_path, capsys, content, why):
    bad = tmp_path / "keep.json"
    bad.write_text(content)
    assert main(["convert", "--quantize", "mxfp8", "--keep", str(bad), str(TINY), str(tmp_path / "q")]) == 2
    assert why in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_one_target_only(capsys):
    assert main([*ARGS, "--target-kl", "1", "--target-top1", "0.5"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
