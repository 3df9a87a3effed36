"""Another port's partial dump against a real reference dump (docs/third-party-ports.md).

The "other port" is written here on rmlx's public model API: it builds its own attention masks and
exposes a subset of the stages (``text.inputs_embeds``, ``mask.*``, ``layers.N.out``, ``logits``) and
one name of its own. Planted defect: image tokens attended causally (no bidirectional image block in
the sliding-window mask)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from parity.cli import main
from rmlx.models.gemma4_unified.load import load_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "fixtures" / "models" / "tiny"
DOC = ROOT / "docs" / "third-party-ports.md"
EXPOSED = ("text.inputs_embeds", "mask.full_attention", "mask.sliding_attention", "layers.0.out", "layers.1.out",
           "layers.2.out", "layers.3.out", "logits")
OWN = "port.image_blocks"  # a tensor of the port's own, outside the stage vocabulary


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The reference side of ``rmlx-parity run --dump`` of one image case."""
    tmp = tmp_path_factory.mktemp("reference")
    assert main(["run", "--dump", str(tmp / "dump"), "--model", str(TINY), "--case", "image/gradient",
                 "--no-oracle", "--decode-steps", "1", "--report-dir", str(tmp / "rep")]) == 0
    return tmp / "dump" / "tiny__image__gradient" / "reference.safetensors"


@pytest.fixture(scope="module")
def model():
    return load_model(TINY, "float32")


def port_masks(types: np.ndarray, window: int, causal_images: bool) -> dict[str, np.ndarray]:
    """The port's own masks (official policy): full = causal; sliding = (causal | same image block) & window."""
    n = types.shape[1]
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    causal = k <= q
    image = types[0] == 1
    blocks = np.where(image, np.cumsum(image & ~np.r_[False, image[:-1]]), 0)
    same = (blocks[:, None] == blocks[None, :]) & (blocks[:, None] > 0)
    if causal_images:  # the planted defect
        same[:] = False
    return {"full_attention": causal[None], "sliding_attention": ((causal | same) & (k > q - window))[None],
            "blocks": blocks[None]}


def other_port(model, reference: Path, out: Path, causal_images: bool = False) -> Path:
    """Run the port on the reference dump's inputs and write the stages it exposes."""
    ref = load_file(str(reference))
    inputs = {k: v for k, v in ref.items() if k.startswith("input.")}
    h, _ = model.embed_inputs(inputs["input.input_ids"], inputs["input.mm_token_type_ids"],
                              ref["image.pixel_values"], ref["image.position_ids"])
    text = model.language_model
    masks = port_masks(inputs["input.mm_token_type_ids"], text.cfg.sliding_window, causal_images)
    stages = {"text.inputs_embeds": h, "mask.full_attention": masks["full_attention"],
              "mask.sliding_attention": masks["sliding_attention"], OWN: masks["blocks"]}
    attend = {kind: mx.array(masks[kind]) for kind in ("full_attention", "sliding_attention")}
    shared_kv = {}
    for i, layer in enumerate(text.layers):
        h = text.step(i, layer, h, attend, None, 0, shared_kv)
        stages[f"layers.{i}.out"] = h
    stages["logits"] = text.head(h)
    arrays = {k: np.array(v) for k, v in stages.items()} | inputs
    digest = hashlib.sha256((TINY / "config.json").read_bytes()).hexdigest()
    save_file(arrays, str(out), metadata={"producer": "other-port (test)", "dtype": "float32",
                                          "mask_policy": "official", "config_sha256": digest})
    return out


def compare(capfd, tmp: Path, ref: Path, cand: Path, *extra) -> tuple[int, str, dict]:
    capfd.readouterr()
    rc = main(["compare", str(ref), str(cand), "--report-dir", str(tmp / "rep"), "--json", str(tmp / "c.json"),
               *extra])
    out, _ = capfd.readouterr()
    return rc, out, json.loads((tmp / "c.json").read_text())


def test_planted_mask_defect_is_the_first_divergence(reference, model, tmp_path, capfd):
    cand = other_port(model, reference, tmp_path / "port.safetensors", causal_images=True)
    rc, out, rec = compare(capfd, tmp_path, reference, cand)
    assert rc == 1 and not rec["passed"]
    assert rec["first_divergence"]["stage"] == "mask.sliding_attention"
    assert "First divergent stage: mask.sliding_attention (case tiny/image/gradient)" in out
    cmp = rec["compare"]
    ref_stages = [k for k in load_file(str(reference)) if not k.startswith("input.")]
    assert cmp["compared"] == list(EXPOSED)
    assert sorted(cmp["missing_in_candidate"]) == sorted(set(ref_stages) - set(EXPOSED))
    assert len(cmp["missing_in_candidate"]) == len(ref_stages) - len(EXPOSED) == 35
    assert cmp["extra_in_candidate"] == cmp["unknown"] == [OWN]
    stages = {s["name"]: s for s in rec["cases"][0]["stages"]}
    assert list(stages) == list(EXPOSED)  # missing and extra stages are no rows: never "exact", never failed
    assert stages["text.inputs_embeds"]["passed"] and stages["mask.full_attention"]["passed"]
    assert not stages["mask.sliding_attention"]["passed"] and stages["mask.sliding_attention"]["mismatched"] > 0
    assert out.splitlines()[1].startswith("8 stages compared (in both dumps), 35 missing in the candidate, "
                                          "1 extra in the candidate")
    assert "stages missing in the candidate (35): image.pixel_values, image.position_ids, vision.patch_ln1" in out
    assert f"stages extra in the candidate (1): {OWN}" in out
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## First divergence: `mask.sliding_attention`" in md and "| vision.soft_tokens |" not in md
    assert rec["settings"]["candidate_mask_policy"] == "official" == rec["settings"]["mask_policy"]
    assert rec["settings"]["max_soft_tokens"] == 280  # the reference dump says so


def test_clean_port_passes_with_missing_stages(reference, model, tmp_path, capfd):
    cand = other_port(model, reference, tmp_path / "port.safetensors")
    rc, out, rec = compare(capfd, tmp_path / "partial", reference, cand)
    assert rc == 0 and rec["passed"] and rec["first_divergence"] is None
    assert len(rec["compare"]["compared"]) == 8 and len(rec["compare"]["missing_in_candidate"]) == 35
    assert "PASS" in out.splitlines()[0]
    # --require-all: a stage in one dump only fails; the first in forward order is the headline
    rc, out, rec = compare(capfd, tmp_path / "all", reference, cand, "--require-all")
    assert rc == 1 and rec["first_divergence"]["stage"] == "image.pixel_values"
    failed = [s["name"] for s in rec["cases"][0]["stages"] if not s["passed"]]
    assert len(failed) == 36 and failed[-1] == OWN and not set(EXPOSED) & set(failed)


def test_the_documented_script(reference, tmp_path, capfd):
    """docs/third-party-ports.md's script, run as a user would, makes a dump that passes compare."""
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    script = tmp_path / "make_dump.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script), str(reference), str(TINY), str(tmp_path / "port.safetensors")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    rc, out, rec = compare(capfd, tmp_path, reference, tmp_path / "port.safetensors")
    assert rc == 0, out
    assert rec["compare"]["compared"] == list(EXPOSED) and len(rec["compare"]["missing_in_candidate"]) == 35
    assert rec["compare"]["metadata"]["candidate"]["producer"] == "my-port 0.1" and not rec["compare"]["warnings"]
    assert out.splitlines()[:2][1].startswith("8 stages compared (in both dumps), 35 missing in the candidate, "
                                              "0 extra in the candidate")
