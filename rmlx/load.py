"""Checkpoint I/O: config.json + safetensors (single file or sharded with an index). Strict.

Missing, unexpected and mis-shaped tensors are errors naming the key and both shapes. A pickle
checkpoint (``pytorch_model.bin``) is refused, never unpickled.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from rmlx.errors import InputError
from rmlx.files import checkpoint_files, read_safetensors_header

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


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
                  key_of=lambda k: k) -> None:
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


def load_checkpoint(model: nn.Module, path: Path, dtype: str, key_of=lambda k: k) -> None:
    """Read a checkpoint directory's safetensors (one file or an index of shards, validated) into
    ``model`` in ``dtype``, strictly: ``model.sanitize`` renames, :func:`check_weights` checks."""
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    weights, source = model.sanitize(load_raw_weights(path))
    check_weights(model, weights, source, key_of)
    target = DTYPES[dtype]
    weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
