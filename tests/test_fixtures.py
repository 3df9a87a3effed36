"""The committed fixtures are what `rmlx-parity fixtures` generates, byte for byte, and have the
properties the harness relies on (no convention can pass by accident)."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from parity.cli import main
from rmlx.models.gemma4_unified.image import target_size
from tests.conftest import FIXTURES, IMAGES


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_manifest_matches_committed_files():
    manifest = json.loads((FIXTURES / "MANIFEST.json").read_text())
    # not generated: baselines/ and recorded/ (recorded runs, docs/fixtures.md) and the package marker
    # that installs fixtures/ as `rmlx_fixtures` (pyproject.toml)
    on_disk = {str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*")
               if p.is_file() and p.relative_to(FIXTURES).parts[0] not in ("baselines", "recorded", "__pycache__")
               and p.name not in ("MANIFEST.json", "__init__.py")}
    assert on_disk == set(manifest["files"]), "files on disk and in the MANIFEST differ"
    for rel, entry in manifest["files"].items():
        assert _sha(FIXTURES / rel) == entry["sha256"], rel
        assert entry["how"]


def test_regeneration_is_byte_identical(tmp_path):
    assert main(["fixtures", "--out", str(tmp_path)]) == 0
    committed = json.loads((FIXTURES / "MANIFEST.json").read_text())
    fresh = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert fresh == committed
    assert (tmp_path / "MANIFEST.json").read_bytes() == (FIXTURES / "MANIFEST.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def _weights(name):
    return load_file(FIXTURES / "models" / name / "model.safetensors")


@pytest.mark.parametrize("name", ["tiny", "tiny-variant"])
def test_checkpoints_have_no_accidental_conventions(name):
    w = _weights(name)
    assert any(k.startswith("model.vision_embedder.") for k in w), "on-disk vision key spelling"
    assert "lm_head.weight" not in w  # tied, not written
    for k, v in w.items():
        if k.endswith(("norm.weight", "layernorm.weight", "patch_ln1.weight", "patch_ln2.weight")):
            assert not np.allclose(v, 1), k
        if k.endswith(".bias"):
            assert not np.allclose(v, 0), k
        if k.endswith("layer_scalar"):
            assert v.item() != 1.0, k
    assert w["model.vision_embedder.patch_dense.weight"].shape[1] == 6912  # 16 px x 3x3 merge x RGB


def test_tiny_and_variant_cover_the_features():
    tiny = json.loads((FIXTURES / "models/tiny/config.json").read_text())["text_config"]
    var = json.loads((FIXTURES / "models/tiny-variant/config.json").read_text())["text_config"]
    assert set(tiny["layer_types"]) == {"sliding_attention", "full_attention"}
    assert tiny["final_logit_softcapping"] is not None
    blocks = [target_size(h, w, 280) for w, h in (Image.open(p).size for p in IMAGES)]
    smallest_block = min(th // 48 * (tw // 48) for th, tw in blocks)
    assert tiny["sliding_window"] < smallest_block
    assert var["attention_k_eq_v"] and var["num_kv_shared_layers"] > 0 and var["use_double_wide_mlp"]
    assert any("num_key_value_heads" in v for v in var["per_layer_config"].values())


def test_battery_covers_resize_and_modes():
    sizes = {p.name: Image.open(p).size[::-1] for p in IMAGES}
    modes = {Image.open(p).mode for p in IMAGES}
    assert {"RGB", "RGBA", "L", "P"} <= modes
    unresized = [n for n, (h, w) in sizes.items() if target_size(h, w, 280) == (h, w)]
    resized = [n for n, (h, w) in sizes.items() if target_size(h, w, 280) != (h, w)]
    assert unresized and resized
    assert any(h != w for h, w in sizes.values())
