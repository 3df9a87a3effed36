"""A port that raises is a verdict: the stage it was computing is named, the other cases still run,
every report is written, and the exit code says the port fails (1). A reference that raises makes
the run untestable (125), with its report."""

import json
from unittest import mock

import mlx.core as mx
import numpy as np

from parity.cli import main
from parity.metrics import logits_agreement
from rmlx.nn import text
from tests.conftest import MODELS

MODEL = MODELS[0]


def _raise_in_layer_2_of_the_38_token_prompt(call):
    def layer(self, x, *args, **kwargs):
        if self.names["out"] == "layers.2.out" and x.shape[1] == 38:  # text-only: 38 tokens
            raise RuntimeError("planted: layer 2 cannot take this prompt")
        return call(self, x, *args, **kwargs)
    return layer


def _run(tmp_path, *extra):
    args = ["run", "--model", str(MODEL), "--case", "text-only", "--case", "image/solid-green", "--no-oracle",
            "--decode-steps", "1", "--report-dir", str(tmp_path / "r"), "--json", str(tmp_path / "r.json"), *extra]
    code = main(args)
    return code, json.loads((tmp_path / "r.json").read_text())


def test_a_port_raising_in_layer_2_of_one_case_is_named_and_the_run_goes_on(tmp_path):
    broken = _raise_in_layer_2_of_the_38_token_prompt(text.DecoderLayer.__call__)
    with mock.patch.object(text.DecoderLayer, "__call__", broken):
        code, rec = _run(tmp_path)
    assert code == 1
    cases = {c["scenario"]: c for c in rec["cases"]}
    assert set(cases) == {"text-only", "image/solid-green"}
    broken = cases["text-only"]
    assert not broken["passed"] and broken["error"]["side"] == "candidate"
    assert broken["error"]["type"] == "RuntimeError" and "planted" in broken["error"]["message"]
    assert broken["first_divergence"]["stage"] == "layers.2.input_layernorm"
    assert broken["error"]["last_stage"] == "layers.1.out"
    stages = {s["name"]: s for s in broken["stages"]}
    assert stages["layers.1.out"]["passed"]  # compared before the crash, as usual
    assert "Not reached" in stages["logits"]["error"]
    assert cases["image/solid-green"]["passed"]  # the other case ran, untouched
    assert rec["first_divergence"]["stage"] == "layers.2.input_layernorm"
    assert {p.name for p in (tmp_path / "r").iterdir()} >= {"report.json", "report.md", "report.html", "junit.xml"}
    assert "layers.2.input_layernorm" in (tmp_path / "r" / "report.md").read_text()


def test_a_port_raising_in_a_decode_step_is_named_there(tmp_path):
    real = text.TextModel.__call__

    def model(self, inputs_embeds, *args, **kwargs):
        if inputs_embeds.shape[1] == 1:
            raise ValueError("planted: no decode")
        return real(self, inputs_embeds, *args, **kwargs)

    with mock.patch.object(text.TextModel, "__call__", model):
        code, rec = _run(tmp_path)
    assert code == 1
    for case in rec["cases"]:
        assert case["first_divergence"]["stage"] == "logits@decode.1", case["first_divergence"]
        assert all(s["passed"] for s in case["stages"] if s["name"] != "logits@decode.1")


def test_a_reference_that_raises_makes_the_run_untestable_with_a_report(tmp_path):
    from reference.gemma4_unified import hf

    def broken(self, *a, **k):
        raise RuntimeError("planted: the reference is broken")

    with mock.patch.object(hf.HFRunner, "forward", broken):
        code, rec = _run(tmp_path)
    assert code == 125
    assert rec["untestable"] and all(c["error"]["side"] == "reference" for c in rec["cases"])
    assert (tmp_path / "r" / "report.md").is_file()


def test_non_finite_logits_fail_with_statistics_not_a_crash():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((6, 50)).astype(np.float32)
    cand = ref.copy()
    cand[2, 7] = np.nan
    cand[4] = np.inf
    out = logits_agreement(cand, ref)
    assert out["nonfinite_positions"] == 2 and out["positions"] == 6 and out["first_nonfinite_position"] == 2
    assert out["top1_agreement"] <= 4 / 6
    assert out["kl_max"] == float("inf")
    assert mx.array(ref).shape == (6, 50)


def test_a_candidate_quantizing_other_layers_gets_stage_verdicts(tmp_path):
    """MLX's default nn.quantize predicate (embeddings and every linear with a multiple-of-32 input),
    not ours: the reference dequantizes what it has a stage for, the rest shows at the stages it feeds."""
    import mlx.nn as nn

    from rmlx.nn import quant

    def quantize(model, mode, overrides=None):
        status = {}

        def every(path, module):
            ok = hasattr(module, "to_quantized") and module.weight.shape[-1] % 32 == 0
            if ok:
                status[path] = "quantized"
            return ok
        nn.quantize(model, mode=mode, class_predicate=every, **quant.MODES[mode])
        return status

    with mock.patch.object(quant, "quantize", quantize):
        code, rec = _run(tmp_path, "--quantize", "mxfp8")
    assert code == 1 and not rec["untestable"]  # the port's verdict, not "cannot test"
    for case in rec["cases"]:  # quantized embedding tables give garbage or make the port raise: both named
        assert case["first_divergence"]["stage"].startswith(("vision.", "text.embed_tokens")), case["name"]
        assert case.get("error") is None or case["error"]["side"] == "candidate"
