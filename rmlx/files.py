"""Files on disk, read with validation: safetensors headers and sharded indexes, checked before any
byte of tensor data is read (sizes, offsets, overlaps, shard names that stay inside the checkpoint
folder), and JSON files of a known schema (:func:`read_json`).

Imports no MLX: ``rmlx-parity compare`` reads dumps with it in a core install.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
from pathlib import Path

from rmlx.errors import InputError, one_line  # noqa: F401 (one_line: also rmlx.files.one_line)

_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
                "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "E8M0": 1, "F8_E8M0": 1}
_ST_DTYPES = set(_ST_ITEMSIZE)


def loads(raw: str | bytes):
    """``json.loads`` that fails only with ``ValueError``: not JSON, not UTF-8, nested too deeply
    (``RecursionError``), or an integer past Python's 4300-digit limit are all ``ValueError``."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def read_json(path: Path, what: str, schema: str | None = None, hint: str = ""):
    """The JSON value in ``path``; ``schema``: it must be an object whose "schema" is that. Every problem
    is an ``InputError`` that starts with ``what`` and the path (``hint`` follows a schema mismatch)."""
    try:
        data = loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise InputError(f"{what} {path}: not found") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InputError(f"{what} {path}: not readable JSON ({type(e).__name__}: {_line(e)})") from None
    if schema is not None and (not isinstance(data, dict) or data.get("schema") != schema):
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{what} {path}: schema is {short(got)}, expected {schema!r}{hint}")
    return data


def _line(e: BaseException) -> str:
    """An exception's text on one line (a message is one line of stderr)."""
    return " ".join(str(e).split())


def finite_number(v) -> bool:
    """A JSON number that is a finite float (not a bool; an integer of 400 digits is not: it has no float)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def short(v, limit: int = 120) -> str:
    """``repr(v)`` on one line, at most ``limit`` characters (a value quoted in a message)."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


class Reads(dict):
    """A JSON object that records, in ``last[0]``, the path of the last key read from it
    (``cases[0].stages[3].cosine``): what :func:`track` wraps a file's content in, so that a reader's
    stray ``TypeError`` can be reported at the key it was reading."""

    def __getitem__(self, key):
        self._last[0] = f"{self._at}.{key}" if self._at else str(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._last[0] = f"{self._at}.{key}" if self._at else str(key)
        return super().get(key, default)

    def __copy__(self):
        return _reads(dict(self), self._at, self._last)

    def __deepcopy__(self, memo):
        return _reads({k: copy.deepcopy(v, memo) for k, v in dict.items(self)}, self._at, self._last)


def _reads(items: dict, at: str, last: list[str]) -> Reads:
    r = Reads(items)
    r._at, r._last = at, last
    return r


def track(value, last: list[str], at: str = "", depth: int = 0, max_depth: int = 32):
    """``value`` (parsed JSON) with every object in it, to ``max_depth``, a :class:`Reads` recording
    into ``last``; lists are copied, other values shared."""
    if depth > max_depth:
        return value
    if isinstance(value, dict):
        return _reads({k: track(v, last, f"{at}.{k}" if at else str(k), depth + 1, max_depth)
                       for k, v in value.items()}, at, last)
    if isinstance(value, list):
        return [track(v, last, f"{at}[{i}]", depth + 1, max_depth) for i, v in enumerate(value)]
    return value


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header (without reading the data)."""
    return safetensors_layout(path)[1]


def safetensors_layout(path: Path) -> tuple[int, dict]:
    """(the byte offset where the data starts, the validated header): what a reader of raw tensor
    bytes needs (``rmlx.models.gemma4_unified.stream``); the header's ``data_offsets`` count from that offset.

    Valid means what the safetensors library itself accepts: a JSON object of tensor entries, each
    ``{"dtype": <known>, "shape": [ints >= 0], "data_offsets": [start, end]}`` whose byte length is
    shape x dtype size, the entries tiling the data exactly (no overlap, no gap, nothing after the
    last), and an optional ``__metadata__`` object of strings (or null)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: corrupt safetensors header (file is {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise InputError(f"{path}: corrupt safetensors header (declares {n} header bytes, file is {size})")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or _line(e)})") from None
    try:
        header = loads(raw)
    except ValueError as e:
        raise InputError(f"{path}: corrupt safetensors header (not JSON: {_line(e)})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise InputError(f"{path}: corrupt safetensors header: '__metadata__' must be an object of "
                                 f"strings, got {short(info)}")
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise InputError(f"{path}: corrupt safetensors header entry for {short(key)} (needs 'dtype', 'shape' "
                             "and 'data_offsets' [start, end])") from None
        ints = [start, end, *shape] if isinstance(shape, list) else None
        if (not isinstance(dtype, str) or dtype not in _ST_DTYPES or ints is None
                or any(isinstance(i, bool) or not isinstance(i, int) for i in ints)
                or not 0 <= start <= end <= data_size or any(d < 0 for d in shape)):
            raise InputError(f"{path}: corrupt safetensors header entry for {short(key)} (dtype {short(dtype)}, "
                             f"shape {short(shape)}, offsets {short(start)}..{short(end)}, data is "
                             f"{data_size} bytes)")
        need = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if need != end - start:
            raise InputError(f"{path}: tensor {short(key)} of shape {short(shape)} {dtype} needs {need} bytes, its "
                             f"offsets {start}..{end} hold {end - start}")
        spans.append((start, end, key))
    covered, last = 0, None  # the tensors tile [0, data_size): each starts where the ones before it end
    for start, end, key in sorted(spans):
        if start < covered:
            raise InputError(f"{path}: tensors {short(last)} and {short(key)} overlap in the data "
                             f"(offsets {start} < {covered})")
        if start > covered:
            raise InputError(f"{path}: corrupt safetensors header: tensor {short(key)} starts at {start}, the tensors "
                             f"before it end at {covered} (a gap in the data)")
        covered, last = end, key
    if covered != data_size:
        raise InputError(f"{path}: corrupt safetensors header: the tensors hold {covered} bytes, the file's "
                         f"data is {data_size}")
    return 8 + n, header


def _fs_name(name: str) -> bool:
    """``name`` can name a file on this system (no NUL byte, encodable in the file-system encoding)."""
    try:
        return "\0" not in name and bool(os.fsencode(name))
    except UnicodeEncodeError:
        return False


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, validated; refuses pickle checkpoints."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            data = loads(index.read_bytes())
        except (OSError, ValueError) as e:
            raise InputError(f"{index}: not a valid safetensors index ({type(e).__name__}: {_line(e)})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index}: not a valid safetensors index (needs a non-empty object 'weight_map', "
                             f"got {short(weight_map) if isinstance(data, dict) else type(data).__name__})")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise InputError(f"{index}: 'weight_map' entry {short(bad[0])} is {short(bad[1])}; it must be a "
                             "shard file name (a string)")
        root = path.resolve()
        files = []
        for name in sorted(set(weight_map.values())):
            # a shard is a plain file name in the checkpoint folder: never a path that leaves it
            if (Path(name).name != name or name in ("", ".", "..") or not name.endswith(".safetensors")
                    or not _fs_name(name)):
                raise InputError(f"{index}: shard name {short(name)} is not a .safetensors file name in {path}")
            f = path / name
            try:
                if f.resolve().parent != root:
                    raise InputError(f"{index}: shard {short(name)} resolves outside {path} (a symlink to "
                                     f"{f.resolve()}); refusing to read it")
                if not f.is_file():
                    raise InputError(f"{index}: names shard {short(name)}, which does not exist")
            except OSError as e:  # a name too long for the file system, a symlink loop
                raise InputError(f"{index}: shard {short(name)} cannot be opened ({e.strerror or _line(e)})") from None
            files.append(f)
        return files
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickles:
        raise InputError(f"{path}: only a pickle checkpoint ({pickles[0]}) found; refusing to unpickle it. "
                         "Convert it to safetensors first.")
    raise InputError(f"{path}: no model.safetensors or model.safetensors.index.json")
