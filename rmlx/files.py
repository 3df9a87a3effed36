"""Files on disk, read with validation: safetensors headers and sharded indexes, checked before any
byte of tensor data is read (sizes, offsets, overlaps, shard names that stay inside the checkpoint
folder), and JSON files of a known schema (:func:`read_json`).

Imports no MLX: ``rmlx-parity compare`` reads dumps with it in a core install.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from rmlx.errors import InputError

_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
                "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "E8M0": 1, "F8_E8M0": 1}
_ST_DTYPES = set(_ST_ITEMSIZE)


def read_json(path: Path, what: str, schema: str | None = None, hint: str = ""):
    """The JSON value in ``path``; ``schema``: it must be an object whose "schema" is that. Every problem
    is an ``InputError`` that starts with ``what`` and the path (``hint`` follows a schema mismatch)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} {path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{what} {path}: not readable JSON ({type(e).__name__}: {e})") from None
    if schema is not None and (not isinstance(data, dict) or data.get("schema") != schema):
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{what} {path}: schema is {got!r}, expected {schema!r}{hint}")
    return data


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
