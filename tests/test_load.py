"""The strict checkpoint loader (rmlx.load) and config reader (rmlx.models.gemma4_unified.config), on real files.

Every checkpoint here is a real file: a copy of a committed fixture edited with safetensors, or one
written by transformers' own ``save_pretrained`` (sharded with an index) / ``state_dict`` (HF's
in-memory key spelling). Bad input must raise ``InputError`` whose message names the file, key,
shape or value at fault. Config resolution is checked against HF's own config class.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from rmlx.errors import InputError
from rmlx.files import checkpoint_files, read_safetensors_header
from rmlx.models.gemma4_unified.config import ModelArgs
from rmlx.models.gemma4_unified.load import load_model
from rmlx.nn.config import TextConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODELS = FIXTURES / "models"
ST = "model.safetensors"
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# helpers


def params(model) -> dict[str, np.ndarray]:
    """Every parameter of an rmlx model as float32 NumPy, keyed by module path."""
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def assert_same_params(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def disk_to_module(key: str) -> str:
    """The on-disk (save_pretrained) spelling -> rmlx module path, written out independently."""
    if key == "model.embed_vision.embedding_projection.weight":
        return "vision_embedder.embedding_projection.weight"
    assert key.startswith("model."), key
    return key[len("model."):]


def shape_spellings(shape: tuple[int, ...]) -> tuple[str, ...]:
    """Ways a message may reasonably print a shape: (a, b) / [a, b] / axb."""
    return (str(tuple(shape)), str(list(shape)), "x".join(map(str, shape)))


def names_shape(msg: str, shape: tuple[int, ...]) -> bool:
    return any(s in msg for s in shape_spellings(shape))


def copy_model(name: str, dst: Path) -> Path:
    shutil.copytree(MODELS / name, dst)
    return dst


def edit_weights(ckpt: Path, edit) -> None:
    """Load ``ckpt/model.safetensors``, apply ``edit(dict)`` in place, save it back."""
    weights = load_file(str(ckpt / ST))
    edit(weights)
    save_file(weights, str(ckpt / ST))


def edit_config(ckpt: Path, edit) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))


def raises_input_error(fn, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg.strip(), f"error message is not one line: {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# shared, built once per module


@pytest.fixture(scope="module")
def hf_tiny():
    """transformers' own model for the 'tiny' fixture (same seeded weights)."""
    from reference.fixtures import build_model

    return build_model("tiny")


@pytest.fixture(scope="module")
def hf_single(hf_tiny, tmp_path_factory) -> Path:
    """``save_pretrained`` of that model as one model.safetensors."""
    out = tmp_path_factory.mktemp("hf") / "single"
    hf_tiny.save_pretrained(out)
    assert (out / ST).is_file() and not (out / INDEX).exists()
    return out


@pytest.fixture(scope="module")
def hf_single_params(hf_single) -> dict[str, np.ndarray]:
    return params(load_model(hf_single))


@pytest.fixture
def tiny(tmp_path) -> Path:
    return copy_model("tiny", tmp_path / "tiny")


# ---------------------------------------------------------------------------------------------
# good checkpoints


@pytest.mark.parametrize("name", ["tiny", "tiny-variant"])
def test_single_file_loads_every_tensor_of_the_file(name, tmp_path):
    ckpt = copy_model(name, tmp_path / name)
    assert checkpoint_files(ckpt) == [ckpt / ST]
    model = load_model(ckpt)
    got = params(model)
    disk = load_file(str(ckpt / ST))
    assert sorted(got) == sorted(disk_to_module(k) for k in disk)
    for key, value in disk.items():
        np.testing.assert_array_equal(got[disk_to_module(key)], value, err_msg=key)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))


def test_dtype_bfloat16_casts_every_parameter(tiny):
    model = load_model(tiny, dtype="bfloat16")
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}


def test_sharded_checkpoint_loads_identically_to_single_file(hf_tiny, hf_single_params, tmp_path):
    out = tmp_path / "sharded"
    hf_tiny.save_pretrained(out, max_shard_size="300KB")
    index = json.loads((out / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3, shards
    assert not (out / ST).exists()
    assert checkpoint_files(out) == [out / s for s in shards]
    assert_same_params(params(load_model(out)), hf_single_params)


def test_hf_in_memory_key_spelling_loads_identically(hf_tiny, hf_single_params, tmp_path):
    state = {k: v.detach().cpu().numpy().copy() for k, v in hf_tiny.state_dict().items()}
    # The in-memory spelling really is the other one (guards against a transformers change making this moot).
    assert "model.embed_vision.patch_ln1.weight" in state
    assert "model.embed_vision.multimodal_embedder.embedding_projection.weight" in state
    assert "lm_head.weight" in state
    assert not any(k.startswith("model.vision_embedder.") for k in state)
    out = tmp_path / "in-memory"
    out.mkdir()
    shutil.copy(MODELS / "tiny" / "config.json", out / "config.json")
    save_file(state, str(out / ST))
    assert_same_params(params(load_model(out)), hf_single_params)


def test_same_tensor_under_both_spellings_is_an_error(tiny):
    def add_in_memory_twin(w):
        w["model.embed_vision.patch_ln1.weight"] = w["model.vision_embedder.patch_ln1.weight"].copy()

    edit_weights(tiny, add_in_memory_twin)
    msg = raises_input_error(load_model, tiny)
    assert "model.embed_vision.patch_ln1.weight" in msg
    assert "model.vision_embedder.patch_ln1.weight" in msg


def test_checkpoint_directory_not_found(tmp_path):
    missing = tmp_path / "nope"
    msg = raises_input_error(load_model, missing)
    assert str(missing) in msg


def test_unknown_dtype_is_refused(tiny):
    msg = raises_input_error(load_model, tiny, dtype="float64")
    assert "float64" in msg


# ---------------------------------------------------------------------------------------------
# missing / unexpected / mis-shaped tensors


@pytest.mark.parametrize("key", [
    "model.language_model.layers.1.self_attn.k_norm.weight",
    "model.language_model.embed_tokens.weight",
    "model.vision_embedder.patch_ln1.weight",
    "model.embed_vision.embedding_projection.weight",
    "model.embed_audio.embedding_projection.weight",
])
def test_missing_tensor_is_named(tiny, key):
    edit_weights(tiny, lambda w: w.pop(key))
    msg = raises_input_error(load_model, tiny)
    assert "missing" in msg
    assert key in msg, f"the message does not name the checkpoint key {key!r}: {msg}"


@pytest.mark.parametrize("key", [
    "model.language_model.layers.0.self_attn.bogus.weight",  # known prefix, no such parameter
    "model.language_model.layers.7.mlp.up_proj.weight",  # a layer the config does not have
    "model.vision_embedder.patch_ln3.weight",
    "model.vision_tower.encoder.layers.0.weight",  # not a gemma4_unified tensor at all
    "extra_tensor",
])
def test_unexpected_tensor_is_named(tiny, key):
    def add(w):
        w[key] = np.zeros((3,), np.float32)

    edit_weights(tiny, add)
    msg = raises_input_error(load_model, tiny)
    assert key in msg


@pytest.mark.parametrize("key,bad_shape", [
    ("model.language_model.layers.1.self_attn.k_norm.weight", (17,)),  # full layer: head_dim 32
    ("model.language_model.layers.0.self_attn.k_proj.weight", (64, 64)),
    ("model.language_model.embed_tokens.weight", (511, 64)),
    ("model.vision_embedder.patch_dense.weight", (6912, 32)),  # transposed
    ("model.vision_embedder.pos_embedding", (1120, 32)),
    ("model.embed_vision.embedding_projection.weight", (32, 64)),
])
def test_wrong_shape_names_key_and_both_shapes(tiny, key, bad_shape):
    good_shape = tuple(load_file(str(tiny / ST))[key].shape)
    assert good_shape != bad_shape

    def reshape(w):
        w[key] = np.zeros(bad_shape, np.float32)

    edit_weights(tiny, reshape)
    msg = raises_input_error(load_model, tiny)
    assert key in msg
    assert names_shape(msg, bad_shape), f"found shape {bad_shape} not named: {msg}"
    assert names_shape(msg, good_shape), f"expected shape {good_shape} not named: {msg}"


# ---------------------------------------------------------------------------------------------
# corrupt safetensors files


def _header_file(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _truncated_data(real: bytes) -> bytes:
    return real[:-1000]


CORRUPT = {
    "garbage": lambda real: bytes(range(256)) * 4,
    "shorter-than-8-bytes": lambda real: b"abc",
    "empty": lambda real: b"",
    "header-length-past-eof": lambda real: struct.pack("<Q", 10**6) + b"{}",
    "header-length-huge": lambda real: struct.pack("<Q", 2**63) + real[8:],
    "not-json": lambda real: _header_file(b"this is not json, it is prose!"),
    "not-utf8": lambda real: _header_file(b"\xff\xfe\xfa" * 8),
    "json-not-an-object": lambda real: _header_file(b"[1, 2, 3]"),
    "entry-missing-offsets": lambda real: _header_file({"x": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
    "entry-unknown-dtype": lambda real: _header_file(
        {"x": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "offsets-past-data": lambda real: _header_file(
        {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "data-truncated": _truncated_data,
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_header_names_the_file(tiny, kind):
    f = tiny / ST
    f.write_bytes(CORRUPT[kind](f.read_bytes()))
    msg = raises_input_error(read_safetensors_header, f)
    assert str(f) in msg
    msg = raises_input_error(load_model, tiny)
    assert str(f) in msg


def test_inconsistent_shape_and_offsets_names_the_file(tiny):
    """A header that passes the offset check but whose shape disagrees with its byte range."""
    f = tiny / ST
    f.write_bytes(_header_file({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4))
    msg = raises_input_error(load_model, tiny)
    assert str(f) in msg


def test_valid_header_is_returned(tiny):
    header = read_safetensors_header(tiny / ST)
    disk = load_file(str(tiny / ST))
    assert sorted(k for k in header if k != "__metadata__") == sorted(disk)
    for k, v in disk.items():
        assert tuple(header[k]["shape"]) == v.shape


# ---------------------------------------------------------------------------------------------
# sharded checkpoints gone wrong


@pytest.fixture
def sharded(hf_tiny, tmp_path) -> Path:
    out = tmp_path / "sharded"
    hf_tiny.save_pretrained(out, max_shard_size="300KB")
    return out


def test_shard_named_in_index_but_absent(sharded):
    shards = sorted(set(json.loads((sharded / INDEX).read_text())["weight_map"].values()))
    gone = shards[1]
    (sharded / gone).unlink()
    msg = raises_input_error(checkpoint_files, sharded)
    assert gone in msg
    msg = raises_input_error(load_model, sharded)
    assert gone in msg


def test_index_not_json_names_the_index(sharded):
    (sharded / INDEX).write_text("{ not json")
    msg = raises_input_error(load_model, sharded)
    assert str(sharded / INDEX) in msg


def test_index_without_weight_map_names_the_index(sharded):
    (sharded / INDEX).write_text(json.dumps({"metadata": {}}))
    msg = raises_input_error(load_model, sharded)
    assert str(sharded / INDEX) in msg


def test_corrupt_shard_names_the_shard(sharded):
    shard = sharded / sorted(set(json.loads((sharded / INDEX).read_text())["weight_map"].values()))[0]
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])
    msg = raises_input_error(load_model, sharded)
    assert str(shard) in msg


def test_tensor_in_two_shards_is_named(sharded):
    shards = sorted(set(json.loads((sharded / INDEX).read_text())["weight_map"].values()))
    first, second = (sharded / s for s in shards[:2])
    a, b = load_file(str(first)), load_file(str(second))
    key = sorted(a)[0]
    b[key] = a[key]
    save_file(b, str(second))
    msg = raises_input_error(load_model, sharded)
    assert key in msg


# ---------------------------------------------------------------------------------------------
# pickle checkpoints are refused, never unpickled


class _CreatesSentinel:
    """Unpickling this calls open(path, 'w'): the sentinel file appears iff something unpickled it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _armed_pickle(sentinel: Path) -> bytes:
    return pickle.dumps({"model.language_model.embed_tokens.weight": _CreatesSentinel(sentinel)})


def test_the_pickle_payload_is_live(tmp_path):
    """Control: unpickling the payload does create its sentinel (so its absence below is proof)."""
    control = tmp_path / "control-sentinel"
    handle = pickle.loads(_armed_pickle(control))["model.language_model.embed_tokens.weight"]
    handle.close()
    assert control.exists()


@pytest.mark.parametrize("bin_name", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin"])
def test_pickle_only_checkpoint_is_refused_unopened(tmp_path, bin_name):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(MODELS / "tiny" / "config.json", ckpt / "config.json")
    sentinel = tmp_path / "SENTINEL-unpickled"
    (ckpt / bin_name).write_bytes(_armed_pickle(sentinel))
    msg = raises_input_error(checkpoint_files, ckpt)
    assert "pickle" in msg.lower() and bin_name in msg
    msg = raises_input_error(load_model, ckpt)
    assert "pickle" in msg.lower() and bin_name in msg
    assert not sentinel.exists(), "the pickle checkpoint was unpickled"


def test_safetensors_wins_over_a_pickle_next_to_it(tiny, tmp_path):
    sentinel = tmp_path / "SENTINEL-unpickled"
    (tiny / "pytorch_model.bin").write_bytes(_armed_pickle(sentinel))
    assert checkpoint_files(tiny) == [tiny / ST]
    load_model(tiny)
    assert not sentinel.exists()


def test_empty_directory_names_what_is_missing(tiny):
    (tiny / ST).unlink()
    msg = raises_input_error(load_model, tiny)
    assert str(tiny) in msg and ST in msg


# ---------------------------------------------------------------------------------------------
# config


def _text_config(name: str) -> dict:
    return json.loads((MODELS / name / "config.json").read_text())["text_config"]


def _absent(d: dict, **extra) -> dict:
    """The other spelling: no per_layer_config; the full-layer sizes as global_* keys."""
    d = copy.deepcopy(d)
    del d["per_layer_config"]
    d.update(extra)
    return d


def _set(d: dict, **kv) -> dict:
    d = copy.deepcopy(d)
    d.update(kv)
    return d


def _drop(d: dict, *keys) -> dict:
    d = copy.deepcopy(d)
    for k in keys:
        d.pop(k, None)
    return d


# Text configs, each resolved by rmlx and by transformers.Gemma4UnifiedTextConfig.
TEXT_VARIANTS = {
    "tiny/per_layer_config": lambda: _text_config("tiny"),
    "tiny/global_head_dim": lambda: _absent(_text_config("tiny"), global_head_dim=32),
    "tiny/global_default_512": lambda: _absent(_text_config("tiny")),
    "tiny/global_kv_heads_without_k_eq_v": lambda: _absent(_text_config("tiny"), global_head_dim=32,
                                                           num_global_key_value_heads=1),
    "tiny/global_kv_heads_with_k_eq_v": lambda: _absent(_text_config("tiny"), global_head_dim=32,
                                                        num_global_key_value_heads=1, attention_k_eq_v=True),
    "tiny/k_eq_v_key_absent": lambda: _drop(_absent(_text_config("tiny"), global_head_dim=32,
                                                    num_global_key_value_heads=1), "attention_k_eq_v"),
    "tiny/per_layer_config_empty": lambda: _set(_text_config("tiny"), per_layer_config={}),
    "tiny/per_layer_config_null": lambda: _set(_text_config("tiny"), per_layer_config=None),
    "tiny/layer_types_default": lambda: _drop(_absent(_text_config("tiny"), global_head_dim=32), "layer_types"),
    "tiny/last_layer_forced_full": lambda: _set(_absent(_text_config("tiny"), global_head_dim=32),
                                                layer_types=["full_attention", "sliding_attention",
                                                             "full_attention", "sliding_attention"]),
    "variant/per_layer_config": lambda: _text_config("tiny-variant"),
    "variant/global_keys": lambda: _absent(_text_config("tiny-variant"), global_head_dim=32,
                                           num_global_key_value_heads=1),
    "variant/global_head_dim_only": lambda: _absent(_text_config("tiny-variant"), global_head_dim=32),
    "variant/k_eq_v_off": lambda: _absent(_text_config("tiny-variant"), global_head_dim=32,
                                          num_global_key_value_heads=1, attention_k_eq_v=False),
    # HF's default pattern makes only layer 5 of 6 full, so it cannot also be KV-shared: no sharing here
    "variant/layer_types_default": lambda: _drop(_absent(_text_config("tiny-variant"), global_head_dim=24,
                                                         num_global_key_value_heads=1), "layer_types")
    | {"num_kv_shared_layers": 0},
}


@pytest.mark.parametrize("variant", sorted(TEXT_VARIANTS))
def test_per_layer_head_dim_and_kv_heads_match_hf(variant):
    import transformers

    d = TEXT_VARIANTS[variant]()
    hf = transformers.Gemma4UnifiedTextConfig(**copy.deepcopy(d))
    ours = TextConfig.from_dict(copy.deepcopy(d))
    assert ours.num_hidden_layers == hf.num_hidden_layers
    assert list(ours.layer_types) == list(hf.layer_types)
    view = hf.per_layer_config
    want = [(view[i].head_dim, view[i].num_key_value_heads)
            for i in range(hf.num_hidden_layers)]
    got = [(ours.layer(i).head_dim, ours.layer(i).num_key_value_heads) for i in range(ours.num_hidden_layers)]
    assert got == want


@pytest.mark.parametrize("name,extra", [
    ("tiny", dict(global_head_dim=32)),
    ("tiny-variant", dict(global_head_dim=32, num_global_key_value_heads=1)),
])
def test_both_spellings_resolve_and_load_identically(name, extra, tmp_path):
    present = TextConfig.from_dict(_text_config(name))
    absent = TextConfig.from_dict(_absent(_text_config(name), **extra))
    n = present.num_hidden_layers
    assert [present.layer(i) for i in range(n)] == [absent.layer(i) for i in range(n)]
    # and the fixture weights load under the rewritten config.json, to the same parameters
    ckpt = copy_model(name, tmp_path / name)
    want = params(load_model(ckpt))

    def rewrite(cfg):
        cfg["text_config"] = _absent(cfg["text_config"], **extra)

    edit_config(ckpt, rewrite)
    assert "per_layer_config" not in json.loads((ckpt / "config.json").read_text())["text_config"]
    assert_same_params(params(load_model(ckpt)), want)


def test_default_global_head_dim_shows_as_a_shape_error(tiny):
    """Dropping both spellings means HF's default 512 for the full layers: the weights no longer fit."""
    edit_config(tiny, lambda cfg: cfg.__setitem__("text_config", _absent(cfg["text_config"])))
    msg = raises_input_error(load_model, tiny)
    assert "model.language_model.layers.1." in msg
    assert "512" in msg


@pytest.mark.parametrize("name", ["tiny", "tiny-variant"])
def test_from_file_reads_the_fixture_config(name):
    args = ModelArgs.from_file(MODELS / name / "config.json")
    raw = json.loads((MODELS / name / "config.json").read_text())
    assert args.text.hidden_size == raw["text_config"]["hidden_size"]
    assert args.text.num_hidden_layers == raw["text_config"]["num_hidden_layers"]
    assert args.vision is not None and args.vision.mm_embed_dim == raw["vision_config"]["mm_embed_dim"]
    assert (args.audio is not None) == (raw.get("audio_config") is not None)
    assert (args.image_token_id, args.boi_token_id, args.eoi_token_id) == (
        raw["image_token_id"], raw["boi_token_id"], raw["eoi_token_id"])
    assert ModelArgs.from_dict(raw) == args


@pytest.mark.parametrize("section,key", [
    ("text_config", "hidden_size"),
    ("text_config", "vocab_size"),
    ("text_config", "intermediate_size"),
    ("text_config", "num_hidden_layers"),
    ("text_config", "num_attention_heads"),
    ("text_config", "num_key_value_heads"),
    ("text_config", "head_dim"),
    ("vision_config", "mm_embed_dim"),
    ("vision_config", "patch_size"),
    ("vision_config", "pooling_kernel_size"),
    ("vision_config", "mm_posemb_size"),
    ("vision_config", "output_proj_dims"),
    (None, "text_config"),
    (None, "image_token_id"),
    (None, "boi_token_id"),
    (None, "eoi_token_id"),
])
@pytest.mark.parametrize("how", ["deleted", "null"])
def test_missing_required_key_is_named(tiny, section, key, how):
    def remove(cfg):
        where = cfg if section is None else cfg[section]
        if how == "deleted":
            del where[key]
        else:
            where[key] = None

    edit_config(tiny, remove)
    cfg_path = tiny / "config.json"
    for fn, arg in ((ModelArgs.from_file, cfg_path), (load_model, tiny)):
        msg = raises_input_error(fn, arg)
        assert f"'{key}'" in msg or f'"{key}"' in msg, msg
        if section is not None:
            assert section in msg
        assert str(cfg_path) in msg
    d = json.loads(cfg_path.read_text())
    msg = raises_input_error(ModelArgs.from_dict, d)
    assert key in msg


@pytest.mark.parametrize("model_type", ["gemma4", "gemma3", "gemma4_unified_text", None, "absent"])
def test_wrong_model_type_is_refused(tiny, model_type):
    def set_type(cfg):
        if model_type == "absent":
            del cfg["model_type"]
        else:
            cfg["model_type"] = model_type

    edit_config(tiny, set_type)
    msg = raises_input_error(load_model, tiny)
    assert "model_type" in msg and "gemma4_unified" in msg
    if model_type not in (None, "absent"):
        assert model_type in msg
    assert str(tiny / "config.json") in msg


def test_config_not_json_names_the_file(tiny):
    (tiny / "config.json").write_text('{"model_type": "gemma4_unified",')
    msg = raises_input_error(load_model, tiny)
    assert str(tiny / "config.json") in msg


def test_config_not_an_object_names_the_file(tiny):
    (tiny / "config.json").write_text("[1, 2]")
    msg = raises_input_error(load_model, tiny)
    assert str(tiny / "config.json") in msg


def test_config_missing_names_the_file(tiny):
    (tiny / "config.json").unlink()
    msg = raises_input_error(load_model, tiny)
    assert str(tiny / "config.json") in msg


def test_layer_types_length_mismatch_is_named(tiny):
    edit_config(tiny, lambda cfg: cfg["text_config"]["layer_types"].append("sliding_attention"))
    msg = raises_input_error(load_model, tiny)
    assert "layer_types" in msg and "num_hidden_layers" in msg


def test_unknown_layer_type_is_named(tiny):
    edit_config(tiny, lambda cfg: cfg["text_config"]["layer_types"].__setitem__(0, "chunked_attention"))
    msg = raises_input_error(load_model, tiny)
    assert "chunked_attention" in msg


@pytest.mark.parametrize("extra,needle", [
    ({"num_kv_shared_layers": 4}, "shares K/V"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                          "full_attention": {"rope_type": "proportional", "rope_theta": 1e6}}}, "rope_type"),
], ids=["kv-shared-without-producer", "unsupported-rope"])
def test_unsupported_text_config_is_an_input_error(extra, needle):
    """Caught while reading config.json (exit 2 in the CLI), not as a traceback while building the model."""
    d = json.loads((FIXTURES / "models" / "tiny" / "config.json").read_text())["text_config"] | extra
    with pytest.raises(InputError, match=needle):
        TextConfig.from_dict(d)


def test_kv_sharing_without_a_producer_is_refused_like_hf():
    """HF raises when its model asks the config for kv_sharing_modes; rmlx refuses at config time."""
    import transformers

    d = _drop(_text_config("tiny-variant"), "layer_types")  # default pattern: the only full layer is shared
    with pytest.raises(ValueError, match="producing a cache"):
        _ = transformers.Gemma4UnifiedTextConfig(**copy.deepcopy(d)).kv_sharing_modes
    with pytest.raises(InputError, match="shares K/V"):
        TextConfig.from_dict(copy.deepcopy(d))


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/model.safetensors", "..",
                                   "model.bin", 7])
def test_an_index_cannot_name_a_file_outside_the_checkpoint(tmp_path, shard):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": shard}}))
    with pytest.raises(InputError, match="model.safetensors.index.json"):
        checkpoint_files(ckpt)


def test_an_index_shard_symlinked_outside_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    (ckpt / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "secret.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(InputError, match="resolves outside"):
        checkpoint_files(ckpt)


def _raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header,message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "corrupt safetensors header entry"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}}, "corrupt safetensors header entry"),
    # issue 18 review: an unhashable dtype was a TypeError (exit 1 in run, a traceback in compare)
    ({"a": {"dtype": [], "shape": [4], "data_offsets": [0, 16]}}, "entry for 'a' \\(dtype \\[\\]"),
    ({"a": {"dtype": {}, "shape": [4], "data_offsets": [0, 16]}}, "entry for 'a' \\(dtype \\{\\}"),
    # the tensors tile the data exactly, as the safetensors library requires
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, "tensor 'b' starts at 12.*a gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "the tensors hold 8 bytes, the file's data is 16"),
    ({"__metadata__": {"format": 1}, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
     "'__metadata__' must be an object of strings"),
    ({"__metadata__": [], "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "'__metadata__'"),
])
def test_a_safetensors_header_that_lies_is_refused(tmp_path, header, message):
    f = tmp_path / "model.safetensors"
    _raw_safetensors(f, header, bytes(16))
    with pytest.raises(InputError, match=message):
        read_safetensors_header(f)


def test_what_safetensors_writers_write_is_accepted(tmp_path):
    """MLX writes ``"__metadata__": null``; a zero-size tensor sits at any offset the others end at."""
    f = tmp_path / "model.safetensors"
    _raw_safetensors(f, {"__metadata__": None, "e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                         "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]},
                         "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "z": {"dtype": "I8", "shape": [0, 3], "data_offsets": [16, 16]}}, bytes(16))
    assert sorted(read_safetensors_header(f)) == ["__metadata__", "a", "b", "e", "z"]


def test_a_deeply_nested_safetensors_header_is_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    raw = ("[" * 100_000 + "]" * 100_000).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(InputError, match="nested too deeply"):
        read_safetensors_header(f)
