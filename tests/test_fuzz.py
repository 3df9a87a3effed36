"""Fuzz every parser of a file a user hands ``rmlx-parity``: safetensors headers (checkpoints and dumps),
``config.json`` (both families), ``model.safetensors.index.json``, baselines and run records.

Inputs are random bytes, truncations, byte flips and mutations of the valid files under ``fixtures/``
(JSON values swapped for another type, nested deeply, huge or negative numbers, "NaN" strings, keys
dropped or added; header bytes flipped, offsets moved). Each parser is followed by what the CLI does
next with what it returned (the model built from a config, the bytes read from a header, the gate
checked with a baseline, the reports rendered from a record), so a value a parser lets through and its
consumer trips on counts as a failure. The only allowed outcomes: success, or ``InputError`` (exit 2)
with a one-line message.

Profiles (``RMLX_FUZZ_PROFILE``): ``fuzz`` (the default run; this file in well under 60 s on two cores)
and ``fuzz-long`` (``nox -s fuzz``: 20 times the examples). The end-to-end checks at the bottom run the
real CLI in a subprocess on a few mutated checkpoints: exit 2, one stderr line, no traceback.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis.control import currently_in_test_context

from parity import gate
from rmlx.errors import InputError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY = FIXTURES / "models" / "tiny"
DUMPS = FIXTURES / "recorded" / "vision-causal" / "tiny__image__solid-green"
RECORD = FIXTURES / "recorded" / "tiny-text-4.json"
BASELINE = FIXTURES / "baselines" / "float32-free.json"
CONFIGS = sorted(p / "config.json" for p in (FIXTURES / "models").iterdir() if (p / "config.json").is_file())

_QUICK = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=800, **_QUICK)
settings.register_profile("fuzz-long", max_examples=16_000, **_QUICK)
PROFILE = settings.get_profile(os.environ.get("RMLX_FUZZ_PROFILE", "fuzz"))


def fuzz(share: float = 1.0):
    """The profile's settings with ``share`` of its examples (the slower parsers draw fewer)."""
    return settings(PROFILE, max_examples=max(10, int(PROFILE.max_examples * share)))


@pytest.fixture(scope="module", autouse=True)
def memory_cap():
    """At most 4 GiB more address space than the process has now: a parser or renderer that sizes an
    allocation by a value of the file fails here with MemoryError, instead of the kernel's OOM killer
    taking this process (or a neighbour) down."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = now + (4 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def scratch():
    """One folder for the whole module (no function-scoped fixture under @given): each example
    overwrites its files."""
    with tempfile.TemporaryDirectory(prefix="rmlx-fuzz-") as d:
        yield Path(d)


def allowed(fn, *args, **kwargs) -> str:
    """Run a parser (and its consumer): success, or an ``InputError`` whose message is one line."""
    try:
        fn(*args, **kwargs)
    except InputError as e:
        msg = str(e)
        assert msg.strip() and "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
        assert len(msg) <= 2000, f"a {len(msg)}-character message"
        outcome = "refused"
    else:
        outcome = "accepted"
    if currently_in_test_context():
        event(outcome)
    return outcome


# ---------------------------------------------------------------------------------------------
# JSON mutations


def _paths(value, prefix=()) -> list[tuple]:
    """Every node of a JSON value as a key path (the root is ())."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


_NASTY = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 10**400, 1e308, -1e308, 0.5,
                     1.5, -0.0, 1e-320, float("nan"), float("inf"), float("-inf"), "", "x", "NaN", "Infinity",
                     "-Infinity", "4", "128.9", "\u0000", "\n", "../../etc/passwd", "/etc/passwd", "\udc80",
                     "float32", "F32", [], {}, [1], {"a": 1}, [[[[]]]], "a" * 1000]),
    st.integers(), st.floats(), st.text(max_size=20),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                 max_leaves=6),
)
NASTY = _NASTY.map(copy.deepcopy)  # sampled_from hands out the same list each time: never mutate that one


def _nested(depth: int, leaf):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@st.composite
def mutated_json(draw, original, paths) -> bytes:
    """``original`` (a parsed JSON value) with 1-3 of its nodes replaced, dropped, nested or grown, as
    JSON text (text, not the value: Hypothesis would print a 5000-deep value recursively)."""
    value = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3), label="mutations")):
        path = draw(st.sampled_from(paths), label="path")
        parent, key = _node(value, path[:-1]), path[-1] if path else None
        if parent is None or (path and not _has(parent, key)):
            continue
        how = draw(st.sampled_from(["replace", "replace", "replace", "drop", "nest", "add", "number"]), label="how")
        if not path:  # the root
            value = draw(NASTY) if how != "nest" else _nested(draw(st.integers(1, 5000)), value)
            continue
        old = parent[key]
        if how == "drop" and isinstance(parent, dict):
            del parent[key]
        elif how == "nest":
            parent[key] = _nested(draw(st.integers(1, 5000), label="depth"), old)
        elif how == "add" and isinstance(old, dict):
            old[draw(st.text(max_size=8), label="new key")] = draw(NASTY)
        elif how == "add" and isinstance(old, list):
            old.append(draw(NASTY))
        elif how == "number" and isinstance(old, int | float) and not isinstance(old, bool):
            third = old / 3 if abs(old) < 1e300 else old
            parent[key] = draw(st.sampled_from([-old, old * 10**6, old + 1, old - 1, third, str(old), -1, 0]))
        else:
            parent[key] = draw(NASTY, label="value")
    return dumps(value)


def _node(value, path):
    for k in path:
        if not _has(value, k):
            return None
        value = value[k]
    return value if isinstance(value, dict | list) else None


def _has(container, key) -> bool:
    if isinstance(container, dict):
        return key in container
    return isinstance(container, list) and isinstance(key, int) and 0 <= key < len(container)


def dumps(value) -> bytes:
    """JSON text as a hostile file could hold it (NaN literals, lone surrogates) and a shallow
    fallback when even ``json.dumps`` cannot nest that deep."""
    try:
        return json.dumps(value).encode("utf-8", "surrogatepass")
    except RecursionError:
        return b"[" * 100_000 + b"]" * 100_000


def json_bytes(original) -> st.SearchStrategy[bytes]:
    """Mutated JSON text, truncated JSON text, JSON text with flipped bytes, or random bytes."""
    paths = _paths(original)
    text = dumps(original)
    return st.one_of(
        mutated_json(original, paths),
        mutated_json(original, paths),
        mutated_json(original, paths),
        st.integers(0, len(text)).map(lambda n: text[:n]),
        flipped(text),
        st.binary(max_size=200),
    )


def flipped(raw: bytes, lo: int = 0, hi: int | None = None) -> st.SearchStrategy[bytes]:
    """``raw`` with 1-8 bytes in [lo, hi) set to random values."""
    hi = len(raw) if hi is None else hi

    @st.composite
    def build(draw):
        b = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            b[draw(st.integers(lo, hi - 1))] = draw(st.integers(0, 255))
        return bytes(b)

    return build()


# ---------------------------------------------------------------------------------------------
# safetensors: checkpoints and dumps


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _assemble(header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header_text) if length is None else length) + header_text + data


@st.composite
def moved_offsets(draw, header: dict, data: bytes) -> bytes:
    """A valid header with one tensor's offsets, shape or dtype changed to a near miss."""
    h = copy.deepcopy(header)
    key = draw(st.sampled_from(sorted(k for k in h if k != "__metadata__")), label="tensor")
    start, end = h[key]["data_offsets"]
    field = draw(st.sampled_from(["start", "end", "both", "swap", "shape", "dtype"]), label="field")
    delta = draw(st.sampled_from([-(2**63), -4096, -4, -2, -1, 1, 2, 4, 4096, 2**40, 2**64]), label="delta")
    if field == "start":
        h[key]["data_offsets"] = [start + delta, end]
    elif field == "end":
        h[key]["data_offsets"] = [start, end + delta]
    elif field == "both":
        h[key]["data_offsets"] = [start + delta, end + delta]
    elif field == "swap":
        h[key]["data_offsets"] = [end, start]
    elif field == "shape":
        shape = list(h[key]["shape"]) or [1]
        shape[draw(st.integers(0, len(shape) - 1))] += delta
        h[key]["shape"] = shape
    else:
        h[key]["dtype"] = draw(st.sampled_from(["F16", "F64", "I8", "BOOL", "f32", "", "E8M0", "Q4"]))
    return _assemble(json.dumps(h, separators=(",", ":")).encode(), data)


@st.composite
def rewritten(draw, header: dict, data: bytes) -> bytes:
    """The same tensors written another valid way: keys reordered, other spacing, trailing header
    spaces (the format's padding), other string metadata."""
    keys = draw(st.permutations(sorted(header)), label="key order")
    h = {k: header[k] for k in keys}
    if draw(st.booleans(), label="metadata"):
        h["__metadata__"] = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.text(max_size=8),
                                                                         max_size=3)), label="metadata value")
    text = json.dumps(h, indent=draw(st.sampled_from([None, 1])), ensure_ascii=draw(st.booleans())).encode()
    return _assemble(text + b" " * draw(st.integers(0, 16), label="padding"), data)


def safetensors_bytes(path: Path) -> st.SearchStrategy[bytes]:
    header, data = _split(path)
    text = json.dumps(header, separators=(",", ":")).encode()
    whole = _assemble(text, data)
    return st.one_of(
        rewritten(header, data),
        mutated_json(header, _paths(header)).map(lambda text: _assemble(text, data)),
        mutated_json(header, _paths(header)).map(lambda text: _assemble(text, data)),
        moved_offsets(header, data),
        moved_offsets(header, data),
        flipped(whole, 0, 8 + len(text)),  # the length prefix and the header
        st.integers(0, len(whole)).map(lambda n: whole[:n]),  # truncated anywhere
        st.integers(0, 2**64 - 1).map(lambda n: _assemble(text, data, n)),  # a lying length prefix
        st.binary(max_size=300),
    )


def _layout_and_read(path: Path) -> None:
    """What a reader of raw tensor bytes does with a header (rmlx.models.gemma4_unified.stream): read each
    tensor's span."""
    from rmlx.files import safetensors_layout

    start, header = safetensors_layout(path)
    with path.open("rb") as f:
        for key, info in header.items():
            if key == "__metadata__":
                continue
            a, b = info["data_offsets"]
            f.seek(start + a)
            assert len(f.read(b - a)) == b - a, f"{key}: the header's span is not in the file"


@fuzz(0.6)
@given(raw=safetensors_bytes(TINY / "model.safetensors"))
def test_fuzz_checkpoint_safetensors_header(scratch, raw):
    f = scratch / "model.safetensors"
    f.write_bytes(raw)
    allowed(_layout_and_read, f)


@fuzz(0.6)
@given(raw=safetensors_bytes(DUMPS / "candidate.safetensors"), side=st.sampled_from(["reference", "candidate"]))
def test_fuzz_compare_reads_a_dump(scratch, raw, side):
    """``rmlx-parity compare``'s reader and the comparison of what it read (one side mutated)."""
    from parity.compare import compare_paths

    case = scratch / "dumps" / "tiny__image__solid-green"
    case.mkdir(parents=True, exist_ok=True)
    other = "candidate" if side == "reference" else "reference"
    shutil.copy(DUMPS / f"{other}.safetensors", case / f"{other}.safetensors")
    (case / f"{side}.safetensors").write_bytes(raw)
    allowed(compare_paths, case / "reference.safetensors", case / "candidate.safetensors")


# ---------------------------------------------------------------------------------------------
# config.json (both families) and the model built from it


def _build(path: Path, model_type: str) -> None:
    """What a run does with a config: read it, then build the port's model (lazily: nothing allocated)."""
    if model_type == "gemma4":
        from rmlx.models.gemma4.config import ModelArgs
        from rmlx.models.gemma4.model import Model
    else:
        from rmlx.models.gemma4_unified.config import ModelArgs
        from rmlx.models.gemma4_unified.model import Model
    args = ModelArgs.from_file(path)
    Model(args)


CONFIG_DATA = [(p, json.loads(p.read_text())) for p in CONFIGS]


@fuzz(1.0)
@given(data=st.data())
def test_fuzz_config_json(scratch, data):
    path, original = data.draw(st.sampled_from(CONFIG_DATA), label="fixture config")
    f = scratch / "config.json"
    f.write_bytes(data.draw(json_bytes(original), label="config.json"))
    allowed(_build, f, original["model_type"])


# ---------------------------------------------------------------------------------------------
# model.safetensors.index.json


@pytest.fixture(scope="module")
def sharded(scratch) -> Path:
    """The tiny checkpoint in two shards with an index (HF's layout)."""
    from safetensors.numpy import load_file, save_file

    out = scratch / "sharded"
    out.mkdir()
    weights = load_file(str(TINY / "model.safetensors"))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(out / shard))
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())},
             "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (scratch / "outside.safetensors").write_bytes((out / "model-00001-of-00002.safetensors").read_bytes())
    (scratch / "valid-index.json").write_text(json.dumps(index))  # the fuzzer overwrites the folder's
    return out


INDEX = {"metadata": {"total_size": 1}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                                      "b.weight": "model-00002-of-00002.safetensors"}}


def _shards(folder: Path) -> None:
    from rmlx.files import checkpoint_files, read_safetensors_header

    for f in checkpoint_files(folder):
        assert f.parent == folder and f.resolve().parent == folder.resolve(), f"{f} is outside {folder}"
        read_safetensors_header(f)


@fuzz(1.0)
@given(raw=st.one_of(json_bytes(INDEX),
                     st.sampled_from(["/etc/passwd", "../outside.safetensors", "./x.safetensors", "..", ".", "",
                                      "a/../../outside.safetensors", "model.safetensors\u0000", "\udcff.safetensors",
                                      "x" * 300 + ".safetensors"]).map(
                         lambda s: dumps({"weight_map": {"a.weight": s}}))))
def test_fuzz_sharded_index(sharded, raw):
    (sharded / "model.safetensors.index.json").write_bytes(raw)
    allowed(_shards, sharded)


# ---------------------------------------------------------------------------------------------
# baselines and run records: the loaders and what gate and report do with what they return


RECORD_DATA = json.loads(RECORD.read_text())
BASELINE_DATA = json.loads(BASELINE.read_text())
# a baseline small enough to mutate quickly: the record's own (the gate passes it unmutated)
SMALL_BASELINE = json.loads(json.dumps(gate.from_record(RECORD_DATA)))


def _gate_baseline(path: Path) -> None:
    baseline = gate.load(path)
    result = gate.check(copy.deepcopy(RECORD_DATA), baseline)
    gate.summary(result)


def _gate_and_render_record(path: Path) -> None:
    from parity import report
    from parity.report import html, junit

    rec = gate.load_record(path)
    result = gate.check(rec, copy.deepcopy(SMALL_BASELINE))
    gate.summary(result)
    report.to_terminal(rec)
    report.to_markdown(rec)
    html.to_html(rec)
    junit.to_junit(rec)


@fuzz(0.6)
@given(raw=st.one_of(json_bytes(SMALL_BASELINE), json_bytes(SMALL_BASELINE),
                     st.just(BASELINE).map(lambda p: p.read_bytes()[: len(p.read_bytes()) // 2])))
def test_fuzz_baseline(scratch, raw):
    f = scratch / "baseline.json"
    f.write_bytes(raw)
    allowed(_gate_baseline, f)


@fuzz(0.4)
@given(raw=json_bytes(RECORD_DATA))
def test_fuzz_run_record(scratch, raw):
    f = scratch / "record.json"
    f.write_bytes(raw)
    allowed(_gate_and_render_record, f)


def _bombs() -> dict:
    """Records whose pictures a renderer would size by a value the file does not back."""
    import base64
    import zlib

    import numpy as np

    from parity.report.viz import pack_array, pack_bool

    def masks(rec, value):
        rec["cases"][0]["viz"]["masks"]["official"]["full_attention"] = value

    def tokens(rec, value):
        rec["cases"][0]["viz"]["masks"]["token_types"] = value

    def positions(rec, value):  # the text record gets an image's patch picture
        rec["cases"][0]["viz"]["patch_error"] = {"positions": value, "patches": [256], "stages": {}, "padding_max": {}}

    big = {"shape": [10**6, 10**6], "b64": pack_bool(np.zeros((2, 2), bool))["b64"]}
    bomb = {"shape": [8, 8], "b64": base64.b64encode(zlib.compress(bytes(1 << 26))).decode()}  # 64 MiB of zeros
    far = pack_array(np.array([[0, 0], [32767, 32767]] * 128), "int16")
    return {"mask-shape-not-backed": (masks, big), "zlib-bomb": (masks, bomb),
            "a-trillion-tokens": (tokens, [[0, 10**12]]), "patch-at-32767": (positions, far)}


@pytest.mark.parametrize("kind", sorted(_bombs()))
def test_a_record_whose_pictures_do_not_fit_is_refused(tmp_path, kind):
    """A record's shapes size the HTML report's arrays: load_record refuses one its bytes do not back
    before any renderer allocates (tests/test_fuzz.py found the first by running out of memory)."""
    edit, value = _bombs()[kind]
    rec = copy.deepcopy(RECORD_DATA)
    edit(rec, value)
    (tmp_path / "r.json").write_text(json.dumps(rec))
    with pytest.raises(InputError, match="r.json"):
        gate.load_record(tmp_path / "r.json")


def test_the_unmutated_files_are_accepted(scratch, sharded):
    """The fuzzers start from valid files: each one passes its parser and consumer."""
    for p, d in CONFIG_DATA:
        assert allowed(_build, p, d["model_type"]) == "accepted", p
    assert allowed(_layout_and_read, TINY / "model.safetensors") == "accepted"
    shutil.copy(scratch / "valid-index.json", sharded / "model.safetensors.index.json")
    assert allowed(_shards, sharded) == "accepted"
    for name, data in (("record.json", RECORD_DATA), ("baseline.json", SMALL_BASELINE)):
        (scratch / name).write_text(json.dumps(data))
    assert allowed(_gate_and_render_record, scratch / "record.json") == "accepted"
    assert allowed(_gate_baseline, scratch / "baseline.json") == "accepted"
    assert allowed(_gate_baseline, BASELINE) == "accepted"  # the embedded default's, which covers the record
    from parity.compare import compare_paths

    assert allowed(compare_paths, DUMPS / "reference.safetensors", DUMPS / "candidate.safetensors") == "accepted"


# ---------------------------------------------------------------------------------------------
# end to end: the real CLI on mutated checkpoints


def _checkpoint(tmp_path: Path, config=None, header=None) -> Path:
    ckpt = Path(shutil.copytree(TINY, tmp_path / "ckpt"))
    if config is not None:
        cfg = json.loads((ckpt / "config.json").read_text())
        config(cfg)
        (ckpt / "config.json").write_text(json.dumps(cfg))
    if header is not None:
        h, data = _split(ckpt / "model.safetensors")
        header(h)
        (ckpt / "model.safetensors").write_bytes(_assemble(json.dumps(h).encode(), data))
    return ckpt


def _first_tensor(h: dict) -> dict:
    return h[sorted(k for k in h if k != "__metadata__")[0]]


E2E = {
    "dtype-list": (dict(header=lambda h: _first_tensor(h).__setitem__("dtype", [])), "dtype []"),
    "dtype-object": (dict(header=lambda h: _first_tensor(h).__setitem__("dtype", {})), "dtype {}"),
    "offsets-gap": (dict(header=lambda h: _first_tensor(h).__setitem__(
        "data_offsets", [x + 4 for x in _first_tensor(h)["data_offsets"]])), "model.safetensors"),
    "metadata-not-strings": (dict(header=lambda h: h.__setitem__("__metadata__", {"format": 1})), "__metadata__"),
    "rope-theta-string": (dict(config=lambda c: c["text_config"]["rope_parameters"]["full_attention"].__setitem__(
        "rope_theta", "x")), "'rope_theta'"),
    "per-layer-head-dim-string": (dict(config=lambda c: c["text_config"]["per_layer_config"]["1"].__setitem__(
        "head_dim", "x")), "'head_dim'"),
    "layer-types-int": (dict(config=lambda c: c["text_config"].__setitem__("layer_types", 5)), "'layer_types'"),
    "per-layer-config-list": (dict(config=lambda c: c["text_config"].__setitem__("per_layer_config", [1])),
                              "'per_layer_config'"),
}


CASES = [("run", k) for k in sorted(E2E)] + [("compare", k) for k in sorted(E2E) if "header" in E2E[k][0]]


@pytest.mark.parametrize("command,kind", CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_cli_refuses_a_mutated_checkpoint_in_one_line(tmp_path, command, kind):
    """Through the real CLI in a subprocess: exit 2, one stderr line naming the file and the key, no
    traceback, nothing written. ``compare`` reads the mutated safetensors file as a dump."""
    edit, needle = E2E[kind]
    ckpt = _checkpoint(tmp_path, **edit)
    if command == "run":
        argv = ["run", "--model", str(ckpt), "--case", "text-only", "--no-oracle"]
        culprit = ckpt / ("config.json" if "config" in edit else "model.safetensors")
    else:
        argv = ["compare", str(ckpt / "model.safetensors"), str(TINY / "model.safetensors")]
        culprit = ckpt / "model.safetensors"
    proc = subprocess.run([sys.executable, "-m", "parity.cli", *argv, "--report-dir", str(tmp_path / "rep")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(culprit) in lines[0] and needle in lines[0], lines[0]
    assert not (tmp_path / "rep").exists() and not (tmp_path / "reports").exists()

