"""Synthetic checkpoints of the real shapes (`rmlx-parity fixtures --shape`): the layout HF's own
save_pretrained writes, sharded with an index, deterministic, loadable by both sides, and in parity."""

import json

import numpy as np
import pytest
from safetensors import safe_open

from parity.cli import main
from reference import synthetic
from reference.fixtures import build_model
from rmlx.models.gemma4_unified.load import load_model
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "mini"
    assert main(["fixtures", "--shape", "mini", "--out", str(out)]) == 0
    return out


def test_on_disk_names_follow_save_pretrained():
    """The rename rule, checked against a checkpoint HF's save_pretrained wrote (the tiny fixture)."""
    model = build_model("tiny")
    with safe_open(FIXTURES / "models" / "tiny" / "model.safetensors", "np") as f:
        disk = set(f.keys())
    assert {synthetic.on_disk(k) for k in model.state_dict() if k != "lm_head.weight"} == disk


def test_mini_layout_shards_and_index(mini):
    index = json.loads((mini / "model.safetensors.index.json").read_text())
    cfg = json.loads((mini / "config.json").read_text())
    layer_types = cfg["text_config"]["layer_types"]
    assert len(layer_types) == 12 and layer_types[5] == layer_types[11] == "full_attention"
    assert layer_types.count("full_attention") == 2 and cfg["text_config"]["attention_k_eq_v"]
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in mini.glob("model-*.safetensors"))
    total = 0
    for file in files:
        with safe_open(mini / file, "np") as f:
            for k in f.keys():
                assert index["weight_map"][k] == file
                total += f.get_tensor(k).nbytes
    assert total == index["metadata"]["total_size"]
    expected = dict(synthetic.tensors(synthetic.config("mini")))
    assert set(index["weight_map"]) == set(expected)


def test_deterministic_and_bfloat16(mini, tmp_path):
    again = tmp_path / "again"
    synthetic.write(again, "mini")
    for p in sorted(mini.glob("*.safetensors")):
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name
    with safe_open(next(mini.glob("*.safetensors")), "np") as f:
        k = next(iter(f.keys()))
        assert str(f.get_tensor(k).dtype) == "bfloat16"


def test_mini_loads_strictly_and_is_in_parity(mini, tmp_path):
    model = load_model(mini)
    assert model.args.text.num_hidden_layers == 12 and model.args.text.layer(5).k_eq_v
    code = main(["run", "--model", str(mini), "--case", "image/gradient", "--case", "text-only", "--no-oracle",
                 "--decode-steps", "1", "--report-dir", str(tmp_path / "rep"), "--json", str(tmp_path / "r.json")])
    rec = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and rec["passed"] and len(rec["cases"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--shape", "mini"], "--shape needs --out"),
    (["--shape", "mini", "--layers", "0", "--out", "X"], "--layers must be >= 1"),
    (["--layers", "3"], "--layers needs --shape"),
])
def test_bad_arguments_are_exit_2(args, message, tmp_path, capsys):
    args = [str(tmp_path / "o") if a == "X" else a for a in args]
    assert main(["fixtures", *args]) == 2
    assert message in capsys.readouterr().err


def test_existing_folder_is_refused(mini, capsys):
    assert main(["fixtures", "--shape", "mini", "--out", str(mini)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_12b_shapes_one_layer(tmp_path):
    """One decoder layer at the real 12B shapes (2.4 GiB in bf16): the tensors HF's model has, nothing else."""
    out = tmp_path / "12b"
    assert main(["fixtures", "--shape", "12b", "--layers", "1", "--out", str(out)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shapes = {}
    for file in set(index["weight_map"].values()):
        with safe_open(out / file, "np") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    assert shapes == dict(synthetic.tensors(synthetic.config("12b", 1)))
    assert shapes["model.language_model.embed_tokens.weight"] == (262144, 3840)
    assert shapes["model.vision_embedder.patch_dense.weight"] == (3840, 6912)
    assert shapes["model.language_model.layers.0.self_attn.q_proj.weight"] == (16 * 512, 3840)  # the last: full
    assert int(np.prod(shapes["model.vision_embedder.pos_embedding"])) == 1120 * 2 * 3840
