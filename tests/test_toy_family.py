"""A third model family, written here: a two-layer MLP language model (torch reference, MLX candidate),
its stage table, scenarios and one planted defect. It runs through run, gate, compare, selftest and every
report format of the core with nothing from Gemma: the proof that the core needs no model."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from parity import adapter as registry
from parity.adapter import Scenario
from parity.capture import Recorder, to_numpy
from parity.cli import main
from parity.defects import Defect, patched
from parity.stages import Stage
from rmlx.tap import tap, tapping

STAGES = (Stage("toy.embed", "embedding", "embed", "output"), Stage("toy.hidden", "dense", "fc1", "output"),
          Stage("toy.act", "dense", "act", "output"), Stage("logits", "logits", "fc2", "output"))
ORDER = {s.name: i for i, s in enumerate(STAGES)}


class ToyMLX:  # the candidate port
    def __init__(self, model_dir):
        self.w = {k: mx.array(v) for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}

    def act(self, x):
        return mx.maximum(x, 0)

    def __call__(self, ids):
        h = tap("toy.embed", self.w["embed"][mx.array(ids)])
        h = tap("toy.hidden", h @ self.w["fc1"].T)
        return tap("logits", tap("toy.act", self.act(h)) @ self.w["fc2"].T)


class ToyAdapter:
    def __init__(self, model_dir):
        self.model_dir = Path(model_dir)
        w = {k: torch.from_numpy(v) for k, v in load_file(str(self.model_dir / "model.safetensors")).items()}
        linear = {k: torch.nn.Linear(*w[k].shape[::-1], bias=False) for k in ("fc1", "fc2")}
        embed = torch.nn.Embedding(*w["embed"].shape)
        self.ref = torch.nn.ModuleDict({"embed": embed, "act": torch.nn.ReLU(), **linear})
        for k in ("embed", "fc1", "fc2"):
            self.ref[k].weight.data = w[k]
        self.candidate_model = self.load_candidate()

    def load_candidate(self):
        return ToyMLX(self.model_dir)

    def supports(self, scenario):
        return scenario.name.startswith("toy/")

    def stages(self, scenario):
        return STAGES

    def inputs(self, scenario, decoded, settings):
        return {"input.input_ids": np.array([scenario.parts[0][1]], np.int64)}, {}

    def _forward(self, ids):
        e = self.ref["embed"](torch.from_numpy(ids))
        h = self.ref["fc1"](e)
        a = self.ref["act"](h)
        out = self.ref["fc2"](a)
        return {"toy.embed": e.numpy(), "toy.hidden": h.numpy(), "toy.act": a.numpy(), "logits": out.numpy()}

    def reference(self, scenario, inputs, pre, settings, decode_steps, unquantized=False, other_masks=None):
        ids, steps, tokens = inputs["input.input_ids"], [], []
        with torch.no_grad():
            cap = self._forward(ids)
            for _ in range(decode_steps):
                tokens.append(int(self._forward(ids)["logits"][0, -1].argmax()))
                ids = np.concatenate([ids, [[tokens[-1]]]], axis=1)
                steps.append(self._forward(ids)["logits"][:, -1:])
        return cap, steps, tokens, None

    def candidate(self, scenario, inputs, decoded, settings, tokens, teacher=None):
        recorder, ids = Recorder(teacher), inputs["input.input_ids"]
        with tapping(recorder):
            mx.eval(self.candidate_model(ids))
        steps = []
        for t in tokens:
            ids = np.concatenate([ids, [[t]]], axis=1)
            steps.append(to_numpy(self.candidate_model(ids))[:, -1:])
        return recorder.capture, steps

    def oracle(self, scenario, decoded, settings):
        return {}


class ToyFamily:
    model_type = "toy2"
    selftest_settings = {}
    defects = {"toy-act-leaky": Defect("toy-act-leaky", "activation", "ReLU ported as leaky ReLU", "toy.act",
                                       lambda: patched((ToyMLX, "act", lambda self, x: mx.maximum(x, 0.1 * x))))}

    def check_settings(self, settings):
        pass

    def load(self, model_dir, settings):
        return ToyAdapter(model_dir)

    def scenarios(self, images, fixture_images):
        return [Scenario("toy/short", (("text", (1, 2, 3)),)), Scenario("toy/long", (("text", tuple(range(12))),))]

    selftest_scenarios = lambda self, fixture_images: self.scenarios([], None)  # noqa: E731

    def supports(self, model_dir, scenario):
        return scenario.name.startswith("toy/")

    def stage_table(self, model_dir):
        return STAGES

    def classify(self, name):
        return next((s for s in STAGES if s.name == name), None)

    def order_key(self, name):
        return (ORDER[name],) if name in ORDER else None

    def expected_stage(self, defect, adapter, scenario):
        return defect.stage


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    (d / "config.json").write_text(json.dumps({"model_type": "toy2"}))
    save_file({k: rng.standard_normal(s).astype(np.float32) for k, s in
               {"embed": (16, 8), "fc1": (12, 8), "fc2": (16, 12)}.items()}, str(d / "model.safetensors"))
    registry.register(ToyFamily())
    yield d
    registry.unregister("toy2")


def test_toy_family_through_every_command(toy, tmp_path):
    common = ["--model", str(toy), "--image", "fixtures/images/gradient.png", "--no-oracle", "--decode-steps", "2"]
    assert main(["run", *common, "--report-dir", str(tmp_path / "run"), "--json", str(tmp_path / "run.json"),
                 "--dump", str(tmp_path / "dump")]) == 0
    rec = json.loads((tmp_path / "run.json").read_text())
    assert [c["scenario"] for c in rec["cases"]] == ["toy/short", "toy/long"] and rec["passed"]
    assert [s["name"] for s in rec["cases"][0]["stages"]] == [s.name for s in STAGES]
    assert {"report.md", "report.json", "report.html", "junit.xml"} <= {p.name for p in (tmp_path / "run").iterdir()}
    base = tmp_path / "baseline.json"
    assert main(["gate", *common, "--baseline", str(base), "--update-baseline",
                 "--report-dir", str(tmp_path / "g1")]) == 0
    assert main(["gate", *common, "--baseline", str(base), "--report-dir", str(tmp_path / "g2")]) == 0
    assert main(["compare", str(tmp_path / "dump"), "--report-dir", str(tmp_path / "cmp"),
                 "--json", str(tmp_path / "cmp.json")]) == 0
    assert json.loads((tmp_path / "cmp.json").read_text())["passed"]


def test_toy_defect_is_caught_and_localised(toy, tmp_path):
    args = ["--model", str(toy), "--no-oracle", "--decode-steps", "1", "--inject", "toy-act-leaky", "--mode", "teacher"]
    assert main(["run", *args, "--report-dir", str(tmp_path / "r"), "--json", str(tmp_path / "r.json")]) == 1
    assert json.loads((tmp_path / "r.json").read_text())["first_divergence"]["stage"] == "toy.act"
    assert main(["selftest", "--model", str(toy), "--report-dir", str(tmp_path / "st"),
                 "--json", str(tmp_path / "st.json")]) == 0
    st = json.loads((tmp_path / "st.json").read_text())
    assert st["detection_score"] == st["localisation_score"] == 1.0 and not st["false_alarms"]
