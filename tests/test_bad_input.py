"""Bad input through the real CLI: exit code 2, ONE clear stderr line naming the culprit, nothing written.

Each case runs ``parity.cli.main([...])`` in-process on one small fixture image and a copy of the
'tiny' checkpoint with one defect planted. Input validation happens before any model runs, so none
of these loads the HF reference; they are quick. stderr is captured at the file-descriptor level,
so a stray warning from any library would count as a second line.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from parity.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GOOD_IMAGE = FIXTURES / "images" / "solid-red.png"
ST = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def tiny(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURES / "models" / "tiny", tmp_path / "tiny"))


@pytest.fixture
def report_dir(tmp_path) -> Path:
    return tmp_path / "rep"


def run(capfd, *, model: Path, image: Path, report_dir: Path, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    return cli(capfd, "run", "--model", str(model), "--image", str(image), "--report-dir", str(report_dir),
               "--no-oracle", *extra)


def cli(capfd, *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in-process -> (exit code, stdout, stderr); usage errors return 2 too."""
    capfd.readouterr()  # drop anything earlier (fixture setup)
    rc = main(list(argv))
    out, err = capfd.readouterr()
    return rc, out, err


def assert_refused(rc: int, out: str, err: str, report_dir: Path, *needles: str) -> str:
    """Exit 2, exactly one non-empty stderr line containing every needle, no report (not even a temp dir)."""
    assert rc == 2, f"exit code {rc}; stderr: {err!r}"
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].strip(), f"expected one stderr line, got {len(lines)}: {err!r}"
    line = lines[0]
    for needle in needles:
        assert needle in line, f"{needle!r} not named in: {line}"
    assert out == "", f"unexpected stdout: {out!r}"
    assert not report_dir.exists(), "a report was written"
    stray = sorted(p.name for p in report_dir.parent.glob(f".{report_dir.name}.*"))
    assert not stray, f"stray temp dirs left: {stray}"
    return line


def edit_weights(ckpt: Path, edit) -> None:
    weights = load_file(str(ckpt / ST))
    edit(weights)
    save_file(weights, str(ckpt / ST))


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed, ~60-byte RGB PNG whose IHDR declares width x height (its IDAT is tiny)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour, no interlace
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


class _CreatesSentinel:
    """Unpickling this calls open(path, 'w'): the sentinel file appears iff something unpickled it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------------------------------------
# bad images


def test_missing_image_file(capfd, tiny, report_dir, tmp_path):
    missing = tmp_path / "no-such-image.png"
    rc, out, err = run(capfd, model=tiny, image=missing, report_dir=report_dir)
    assert_refused(rc, out, err, report_dir, str(missing))


def test_image_path_is_a_directory(capfd, tiny, report_dir, tmp_path):
    folder = tmp_path / "folder.png"
    folder.mkdir()
    rc, out, err = run(capfd, model=tiny, image=folder, report_dir=report_dir)
    assert_refused(rc, out, err, report_dir, str(folder))


@pytest.mark.parametrize("name", ["solid-red.png", "white-card.png", "exact-672x960.png"])
def test_truncated_png(capfd, tiny, report_dir, tmp_path, name):
    data = (FIXTURES / "images" / name).read_bytes()
    bad = tmp_path / f"truncated-{name}"
    bad.write_bytes(data[: len(data) // 2])
    rc, out, err = run(capfd, model=tiny, image=bad, report_dir=report_dir)
    assert_refused(rc, out, err, report_dir, str(bad))


@pytest.mark.parametrize("content", [b"hello, this is plain text, not a picture\n", b"", b"\x89PNG\r\n\x1a\n"],
                         ids=["text", "empty", "signature-only"])
def test_not_an_image(capfd, tiny, report_dir, tmp_path, content):
    bad = tmp_path / "not-really.png"
    bad.write_bytes(content)
    rc, out, err = run(capfd, model=tiny, image=bad, report_dir=report_dir)
    assert_refused(rc, out, err, report_dir, str(bad))


@pytest.mark.parametrize("side", [20000, 10000], ids=["over-error-limit", "over-warning-limit"])
def test_decompression_bomb_png_is_well_formed(tmp_path, monkeypatch, side):
    """Control: the hand-written PNG really is a PNG declaring side x side (so the refusal below is
    Pillow's bomb check, not a parse error). Only the header is read; nothing is decoded."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(side, side))
    assert path.stat().st_size < 100
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(path) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (side, side))


@pytest.mark.parametrize("side", [20000, 10000], ids=["over-error-limit", "over-warning-limit"])
def test_decompression_bomb(capfd, tiny, report_dir, tmp_path, side):
    assert side * side > Image.MAX_IMAGE_PIXELS
    bomb = tmp_path / f"bomb-{side}.png"
    bomb.write_bytes(png_declaring(side, side))
    rc, out, err = run(capfd, model=tiny, image=bomb, report_dir=report_dir)
    line = assert_refused(rc, out, err, report_dir, str(bomb))
    assert "decompression" in line.lower() or "bomb" in line.lower()


def test_bad_image_is_reported_even_after_a_good_one(capfd, tiny, report_dir, tmp_path):
    missing = tmp_path / "second-missing.png"
    rc, out, err = cli(capfd, "run", "--model", str(tiny), "--image", str(GOOD_IMAGE), "--image", str(missing),
                       "--report-dir", str(report_dir), "--no-oracle")
    assert_refused(rc, out, err, report_dir, str(missing))


# ---------------------------------------------------------------------------------------------
# bad settings


@pytest.mark.parametrize("value", ["100", "0", "-70", "281"])
def test_unsupported_max_soft_tokens(capfd, tiny, report_dir, value):
    rc, out, err = run(capfd, model=tiny, image=GOOD_IMAGE, report_dir=report_dir,
                       extra=("--max-soft-tokens", value))
    line = assert_refused(rc, out, err, report_dir, value)
    assert "max_soft_tokens" in line or "max-soft-tokens" in line


@pytest.mark.parametrize("extra,needle", [
    (("--max-soft-tokens", "lots"), "lots"),
    (("--dtype", "float64"), "float64"),
    (("--mode", "sideways"), "sideways"),
])
def test_bad_usage(capfd, tiny, report_dir, extra, needle):
    rc, out, err = run(capfd, model=tiny, image=GOOD_IMAGE, report_dir=report_dir, extra=extra)
    assert_refused(rc, out, err, report_dir, needle)


# ---------------------------------------------------------------------------------------------
# bad checkpoints


def test_missing_model_dir(capfd, report_dir, tmp_path):
    missing = tmp_path / "no-such-model"
    rc, out, err = run(capfd, model=missing, image=GOOD_IMAGE, report_dir=report_dir)
    assert_refused(rc, out, err, report_dir, str(missing))


@pytest.mark.parametrize("key", [
    "model.language_model.layers.1.self_attn.k_norm.weight",
    "model.vision_embedder.patch_dense.weight",
])
def test_checkpoint_missing_tensor(capfd, tiny, report_dir, key):
    edit_weights(tiny, lambda w: w.pop(key))
    rc, out, err = run(capfd, model=tiny, image=GOOD_IMAGE, report_dir=report_dir)
    assert_refused(rc, out, err, report_dir, key)


def test_checkpoint_unexpected_tensor(capfd, tiny, report_dir):
    key = "model.language_model.layers.0.self_attn.bogus.weight"
    edit_weights(tiny, lambda w: w.__setitem__(key, np.zeros((2,), np.float32)))
    rc, out, err = run(capfd, model=tiny, image=GOOD_IMAGE, report_dir=report_dir)
    assert_refused(rc, out, err, report_dir, key)


@pytest.mark.parametrize("key,bad_shape,good_shape", [
    ("model.language_model.layers.1.self_attn.k_norm.weight", (17,), (32,)),
    ("model.vision_embedder.patch_dense.weight", (6912, 32), (32, 6912)),
])
def test_checkpoint_wrong_shape(capfd, tiny, report_dir, key, bad_shape, good_shape):
    assert load_file(str(tiny / ST))[key].shape == good_shape
    edit_weights(tiny, lambda w: w.__setitem__(key, np.zeros(bad_shape, np.float32)))
    rc, out, err = run(capfd, model=tiny, image=GOOD_IMAGE, report_dir=report_dir)
    assert_refused(rc, out, err, report_dir, key, str(bad_shape), str(good_shape))


@pytest.mark.parametrize("corrupt", [
    lambda data: bytes(range(256)) * 4,  # garbage
    lambda data: struct.pack("<Q", 10**6) + b"{}",  # header length past EOF
    lambda data: struct.pack("<Q", 24) + b"this is not json at all!" + data[32:],  # not JSON
    lambda data: data[: len(data) // 2],  # data cut short
], ids=["garbage", "length-past-eof", "not-json", "truncated"])
def test_corrupt_safetensors(capfd, tiny, report_dir, corrupt):
    f = tiny / ST
    f.write_bytes(corrupt(f.read_bytes()))
    rc, out, err = run(capfd, model=tiny, image=GOOD_IMAGE, report_dir=report_dir)
    assert_refused(rc, out, err, report_dir, str(f))


def test_missing_config_key(capfd, tiny, report_dir):
    cfg = json.loads((tiny / "config.json").read_text())
    del cfg["vision_config"]["mm_embed_dim"]
    (tiny / "config.json").write_text(json.dumps(cfg))
    rc, out, err = run(capfd, model=tiny, image=GOOD_IMAGE, report_dir=report_dir)
    assert_refused(rc, out, err, report_dir, "mm_embed_dim", str(tiny / "config.json"))


def test_pickle_only_checkpoint(capfd, tiny, report_dir, tmp_path):
    (tiny / ST).unlink()
    sentinel = tmp_path / "SENTINEL-unpickled"
    payload = pickle.dumps({"model.language_model.embed_tokens.weight": _CreatesSentinel(sentinel)})
    (tiny / "pytorch_model.bin").write_bytes(payload)
    rc, out, err = run(capfd, model=tiny, image=GOOD_IMAGE, report_dir=report_dir)
    line = assert_refused(rc, out, err, report_dir, "pytorch_model.bin")
    assert "pickle" in line.lower()
    assert not sentinel.exists(), "the pickle checkpoint was unpickled"
    # control: the payload is live, so the sentinel's absence above means it was never unpickled
    pickle.loads(payload)["model.language_model.embed_tokens.weight"].close()
    assert sentinel.exists()


# ---------------------------------------------------------------------------------------------
# the real entry point, in a fresh interpreter


def test_console_entry_point_missing_image(tiny, tmp_path):
    missing = tmp_path / "no-such-image.png"
    report_dir = tmp_path / "rep"
    proc = subprocess.run(
        [sys.executable, "-m", "parity.cli", "run", "--model", str(tiny), "--image", str(missing),
         "--report-dir", str(report_dir), "--no-oracle"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert_refused(proc.returncode, proc.stdout, proc.stderr, report_dir, str(missing))
    assert not (tmp_path / "reports").exists()


def test_missing_fixtures_cannot_test_this_revision(capfd, tmp_path, monkeypatch):
    """No embedded default (e.g. a revision before fixtures existed): exit 125, skipped by bisect."""
    monkeypatch.setenv("RMLX_FIXTURES", str(tmp_path / "nowhere"))
    rc, out, err = cli(capfd, "run", "--report-dir", str(tmp_path / "rep"))
    assert rc == 125 and "cannot test" in err
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("key,value,message", [
    ("text_config.num_attention_heads", "4", "'num_attention_heads' must be an integer, got '4'"),
    ("text_config.hidden_size", 128.9, "'hidden_size' must be an integer, got 128.9"),
    ("text_config.hidden_size", -4, "'hidden_size' = -4 is out of range"),
    ("text_config.num_hidden_layers", 0, "'num_hidden_layers' = 0 is out of range"),
    ("text_config.vocab_size", 10**12, "'vocab_size' = 1000000000000 is out of range"),
    ("tie_word_embeddings", "yes", "'tie_word_embeddings' must be true or false"),
    ("text_config.rms_norm_eps", "1e-6", "'rms_norm_eps' must be a positive finite number"),
    ("vision_config.patch_size", True, "'patch_size' must be an integer, got True"),
    # issue 18 review: values that reached the model (exit 1) or a message without the key
    ("text_config.rope_parameters.full_attention.rope_theta", "x",
     "text_config.rope_parameters.full_attention: 'rope_theta' must be a positive finite number, got 'x'"),
    ("text_config.rope_parameters.sliding_attention.partial_rotary_factor", 2.0,
     "'partial_rotary_factor' = 2.0 is out of range (0, 1.0]"),
    ("text_config.rope_theta", "x", "text_config: 'rope_theta' must be a positive finite number, got 'x'"),
    ("text_config.rope_parameters.full_attention.partial_rotary_factor", None,  # found by tests/test_fuzz.py
     "rope_parameters['full_attention']: 'partial_rotary_factor' must be a positive finite number, got None"),
    ("text_config.per_layer_config.1.head_dim", "x",
     "text_config.per_layer_config.1: 'head_dim' must be an integer, got 'x'"),
    ("text_config.per_layer_config.1", 7, "per_layer_config['1'] must be an object of overrides, got 7"),
    ("text_config.per_layer_config.1.num_key_value_heads", 3, "not a multiple of layer 1's num_key_value_heads=3"),
    ("text_config.layer_types", 5, "'layer_types' must be a list of strings, got 5"),
    ("text_config.per_layer_config", [1], "'per_layer_config' must be an object, got [1]"),
    ("vision_config", "x", "'vision_config' must be an object, got 'x'"),
    ("audio_config.audio_embed_dim", "640", "'audio_embed_dim' must be an integer, got '640'"),
    ("quantization", [1], "'quantization' must be an object, got [1]"),
])
def test_a_config_value_of_the_wrong_type_or_range_is_named(tmp_path, capsys, key, value, message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "models" / "tiny", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert main(["run", "--model", str(ckpt), "--case", "text-only", "--report-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "config.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_deeply_nested_config_json_is_bad_input(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "models" / "tiny", ckpt)
    (ckpt / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    assert main(["run", "--model", str(ckpt), "--report-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "JSON" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,env,message", [
    (["run", "--threads", "100000"], {}, "--threads must be in 1..256"),
    (["run"], {"RMLX_BLAS": "bogus"}, "RMLX_BLAS='bogus'"),
    (["run"], {"RMLX_NATIVE_MATH": "yes"}, "RMLX_NATIVE_MATH='yes' is not '0' or '1'"),
    (["run"], {"RMLX_NATIVE_KERNELS": "2"}, "RMLX_NATIVE_KERNELS='2' is not '0' or '1'"),
])
def test_bad_threads_and_blas_choice_are_bad_input(tmp_path, capsys, monkeypatch, argv, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main([*argv, "--report-dir", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["", "0", "1"])
def test_the_native_switches_take_0_1_or_nothing(monkeypatch, capsys, value):
    monkeypatch.setenv("RMLX_NATIVE_MATH", value)
    monkeypatch.setenv("RMLX_NATIVE_KERNELS", value)
    assert main(["faults"]) == 0
    assert capsys.readouterr().err == ""


def test_a_gemma4_config_value_of_the_wrong_type_is_named(tmp_path):
    """The gemma4 family reads config.json through the same reader: its keys are checked alike."""
    from rmlx.errors import InputError
    from rmlx.models.gemma4.config import ModelArgs

    for key, value, message in (("rope_parameters", 5, "vision_config: 'rope_parameters' must be an object, got 5"),
                                ("head_dim", "x", "vision_config: 'head_dim' must be an integer, got 'x'"),
                                ("head_dim", -8, "vision_config: 'head_dim' = -8 is out of range")):
        cfg = json.loads((FIXTURES / "models" / "gemma4-tiny" / "config.json").read_text())
        cfg["vision_config"][key] = value
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            ModelArgs.from_file(tmp_path / "config.json")
        assert str(tmp_path / "config.json") in str(e.value)


def test_a_deeply_nested_baseline_is_bad_input(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    rc = main(["gate", "--record", str(FIXTURES / "recorded" / "tiny-text-4.json"), "--baseline", str(deep)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(deep) in err and "nested too deeply" in err and "Traceback" not in err


def test_a_message_quoting_a_newline_is_still_one_line(tmp_path, capsys):
    """A key (or a file name) with a newline in it is quoted escaped: stderr gets one line."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "models" / "tiny", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["per_layer_config"] = {"1\nInjected: line": {"head_dim": 32}}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert main(["run", "--model", str(ckpt), "--case", "text-4", "--report-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "per_layer_config key '1\\nInjected: line'" in err, err


def test_a_baseline_error_too_large_for_an_allowance_is_bad_input(tmp_path, capsys):
    """Found by tests/test_fuzz.py: an error of 1e308 made the allowance infinite and the summary raise."""
    from parity import gate

    record = FIXTURES / "recorded" / "tiny-text-4.json"
    baseline = gate.from_record(json.loads(record.read_text()))
    baseline["cases"]["tiny/text-4"]["stages"][""] = 1e308
    (tmp_path / "b.json").write_text(json.dumps(baseline))
    assert main(["gate", "--record", str(record), "--baseline", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has value 1e+308; expected an error in [0, 1e+300]" in err, err
