"""Checkpoint I/O: config.json + safetensors (single file or sharded with an index). Strict.

Missing, unexpected and mis-shaped tensors are errors naming the key and both shapes. A pickle
checkpoint (``pytorch_model.bin``) is refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from rmlx import quant
from rmlx.config import ModelArgs
from rmlx.errors import InputError
from rmlx.model import Model, checkpoint_key, module_path

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
                "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "E8M0": 1, "F8_E8M0": 1}
_ST_DTYPES = set(_ST_ITEMSIZE)


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header (without reading the data)."""
    return safetensors_layout(path)[1]


def safetensors_layout(path: Path) -> tuple[int, dict]:
    """(the byte offset where the data starts, the validated header): what a reader of raw tensor
    bytes needs (``rmlx.stream``); the header's ``data_offsets`` count from that offset."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: corrupt safetensors header (file is {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise InputError(f"{path}: corrupt safetensors header (declares {n} header bytes, file is {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    except RecursionError:
        raise InputError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise InputError(f"{path}: corrupt safetensors header entry for '{key}'") from None
        ints = [start, end, *shape] if isinstance(shape, list) else None
        if (dtype not in _ST_DTYPES or ints is None or any(isinstance(i, bool) or not isinstance(i, int) for i in ints)
                or not 0 <= start <= end <= data_size or any(d < 0 for d in shape)):
            raise InputError(f"{path}: corrupt safetensors header entry for '{key}' "
                             f"(dtype {dtype}, shape {shape}, offsets {start}..{end}, data is {data_size} bytes)")
        need = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if need != end - start:
            raise InputError(f"{path}: tensor '{key}' of shape {shape} {dtype} needs {need} bytes, its offsets "
                             f"{start}..{end} hold {end - start}")
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], key) for key, info in header.items()
                   if key != "__metadata__" and info["data_offsets"][0] < info["data_offsets"][1])
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise InputError(f"{path}: tensors '{a}' and '{b}' overlap in the data (offsets {start_b} < {end_a})")
    return 8 + n, header


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, validated; refuses pickle checkpoints."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError, UnicodeDecodeError) as e:
            raise InputError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise InputError(f"{index}: 'weight_map' must map tensor names to shard file names (strings)")
        root = path.resolve()
        files = []
        for name in sorted(set(weight_map.values())):
            f = path / name
            # a shard is a plain file name in the checkpoint folder: never a path that leaves it
            if Path(name).name != name or name in ("", ".", "..") or not name.endswith(".safetensors"):
                raise InputError(f"{index}: shard name {name!r} is not a .safetensors file name in {path}")
            if f.resolve().parent != root:
                raise InputError(f"{index}: shard {name!r} resolves outside {path} (a symlink to "
                                 f"{f.resolve()}); refusing to read it")
            if not f.is_file():
                raise InputError(f"{index}: names shard '{name}', which does not exist")
            files.append(f)
        return files
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickles:
        raise InputError(f"{path}: only a pickle checkpoint ({pickles[0]}) found; refusing to unpickle it. "
                         "Convert it to safetensors first.")
    raise InputError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_raw_weights(path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in checkpoint_files(path):
        header = read_safetensors_header(f)
        try:
            loaded = mx.load(str(f))
        except (RuntimeError, ValueError) as e:
            raise InputError(f"{f}: cannot read safetensors data ({e})") from None
        for key in header:
            if key != "__metadata__" and key in weights:
                raise InputError(f"{f}: tensor '{key}' also appears in another shard")
        weights.update(loaded)
    return weights


def check_weights(model: nn.Module, weights: dict[str, mx.array], source: dict[str, str],
                  key_of=checkpoint_key) -> None:
    """Every parameter of ``model`` given once with its shape, nothing else; ``key_of``: a module path ->
    its checkpoint key, for the message."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    if missing:
        names = [key_of(k) for k in missing]
        raise InputError(f"checkpoint is missing tensor(s): {names[:8]}{' ...' if len(names) > 8 else ''} "
                         f"({len(names)} in all; expected shape {expected[missing[0]]} for '{names[0]}')")
    if unexpected:
        raise InputError(f"checkpoint has unexpected tensor(s): {[source[k] for k in unexpected]}")
    for k in sorted(expected):
        got = tuple(weights[k].shape)
        if got != expected[k]:
            raise InputError(f"tensor '{source[k]}' has shape {got}, the config implies {expected[k]}")


def load_checkpoint(model: nn.Module, path: Path, dtype: str, key_of=checkpoint_key) -> None:
    """Read a checkpoint directory's safetensors (one file or an index of shards, validated) into
    ``model`` in ``dtype``, strictly: ``model.sanitize`` renames, :func:`check_weights` checks."""
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    weights, source = model.sanitize(load_raw_weights(path))
    check_weights(model, weights, source, key_of)
    target = DTYPES[dtype]
    weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)


def load_model(path: str | Path, dtype: str = "float32", quantize: str | None = None) -> Model:
    """Load a gemma4_unified checkpoint directory into an MLX ``Model`` in ``dtype``.

    An MLX-style quantized checkpoint (``config.json`` "quantization") loads as quantized linears;
    ``quantize="mxfp8"`` quantizes an unquantized checkpoint on load. ``model.quant_status`` says,
    per quantizable module, whether it was quantized or why not.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: checkpoint directory not found")
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    args = ModelArgs.from_file(path / "config.json")
    model = Model(args)
    model.quant_status = {}
    if args.quantization:
        if quantize is not None:
            raise InputError(f"{path}: the checkpoint is already quantized; drop --quantize")
        model.quant_status = _quantize_as_stored(model, args.quantization, path)
    load_checkpoint(model, path, dtype)
    if quantize is not None:
        model.quant_status = quant.quantize(model, quantize)
    mx.eval(model.parameters())
    return model




def save_quantized(src: str | Path, dst: str | Path, mode: str) -> dict[str, str]:
    """``rmlx-parity convert``: write an MLX-style quantized copy of checkpoint ``src`` into the folder
    ``dst`` (created if missing; it must be empty). ``rmlx-parity convert`` writes into a temporary
    folder and renames it into place (``parity.atomic``).

    Tensors keep the on-disk HF key spelling (``<module>.weight`` uint32 words + ``<module>.scales``);
    ``config.json`` gains "quantization" with ``False`` for every module left unquantized.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise InputError(f"{dst}: already exists and is not empty; choose a new folder")
    model = load_model(src, "float32", quantize=mode)
    config = json.loads((src / "config.json").read_text())
    skipped = {checkpoint_key(p + ".weight")[: -len(".weight")]: False
               for p, s in model.quant_status.items() if s != "quantized"}
    config["quantization"] = {**quant.MODES[mode], "mode": mode, **skipped}
    dst.mkdir(parents=True, exist_ok=True)
    weights = {checkpoint_key(k): v for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", dst / "generation_config.json")
    return model.quant_status


def _quantize_as_stored(model: Model, q: dict, path: Path) -> dict[str, str]:
    mode = q.get("mode", "affine")
    if mode not in quant.MODES:
        raise InputError(f"{path / 'config.json'}: quantization mode {mode!r} is not supported")
    for key in ("group_size", "bits"):
        if q.get(key) != quant.MODES[mode][key]:
            raise InputError(f"{path / 'config.json'}: quantization {key}={q.get(key)!r}, {mode} needs "
                             f"{quant.MODES[mode][key]}")
    overrides = {module_path(k): v for k, v in q.items() if k not in ("group_size", "bits", "mode")}
    return quant.quantize(model, mode, overrides)
