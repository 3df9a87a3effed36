"""MXFP8 quantization of the port: which modules, quantize-on-load, MLX-style quantized checkpoints.

OCP Microscaling FP8: blocks of 32 inputs share one E8M0 scale; elements are FP8 E4M3 (MLX's
``mode="mxfp8"``: ``weight`` uint32 words, ``scales`` uint8). Quantizable: ``patch_dense`` and the
decoder linears. A module whose input size is not a multiple of 32 cannot be blocked; it is left
unquantized and reported as such, never silently mangled.
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from rmlx.errors import InputError
from rmlx.nn.base import cpu_streams

MODES = {"mxfp8": {"group_size": 32, "bits": 8}}
_QUANTIZABLE = re.compile(
    r"^(vision_embedder\.patch_dense"
    r"|language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj))$")


def quantizable(path: str) -> bool:
    return bool(_QUANTIZABLE.match(path))


def dequantized_name(path: str) -> str | None:
    """The public stage of a quantized module's dequantized weight (e.g. ``vision.patch_dense.weight``)."""
    if path == "vision_embedder.patch_dense":
        return "vision.patch_dense.weight"
    m = re.match(r"^language_model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$", path)
    if m:
        return f"layers.{m.group(1)}.{'attn' if m.group(2) == 'self_attn' else 'mlp'}.{m.group(3)}.weight"
    return None


def quantize(model: nn.Module, mode: str, overrides: dict | None = None, prefix: str = "") -> dict[str, str]:
    """Quantize the quantizable linears of ``model`` in place. ``overrides``: {module path: False |
    {"group_size", "bits", "mode"}} as in an MLX ``config.json`` "quantization" section. ``prefix``:
    the path of ``model`` in the whole model (a streamed decoder layer: ``language_model.layers.3.``).

    Returns {module path: "quantized" | reason it was left unquantized}.
    """
    if mode not in MODES:
        raise InputError(f"quantization mode {mode!r} is not supported; choose one of {sorted(MODES)}")
    overrides = overrides or {}
    status: dict[str, str] = {}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        path = prefix + path
        if not isinstance(module, nn.Linear) or not quantizable(path):
            return False
        k = module.weight.shape[1]
        if k % MODES[mode]["group_size"]:
            status[path] = f"left unquantized: input size {k} is not a multiple of {MODES[mode]['group_size']}"
            return False
        if overrides.get(path) is False:
            status[path] = "left unquantized: per-module override"
            return False
        status[path] = "quantized"
        return overrides.get(path) or True

    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)  # nn.quantize's order
    chosen = [(path, m, params) for path, m in leaves if (params := predicate(path, m))]
    quantized = []
    for (path, m, params), stream in zip(chosen, _spread([m.weight.size for _, m, _ in chosen]), strict=True):
        with mx.stream(stream):  # mx.quantize runs on one thread per stream: the modules spread over two
            quantized.append((path, m.to_quantized(**(params if isinstance(params, dict)
                                                       else MODES[mode] | {"mode": mode}))))
    if quantized:
        model.update_modules(tree_unflatten(quantized))
    return status


def _spread(sizes: list[int]) -> list[mx.Stream]:
    """A stream for each of a list of jobs: on the CPU, each to the one of its two streams with the
    less work so far (the same values whichever computes them); elsewhere the default stream."""
    if mx.default_device() != mx.cpu:
        return [mx.default_stream(mx.default_device())] * len(sizes)
    streams, load, out = cpu_streams(), [0, 0], []
    for size in sizes:
        i = load.index(min(load))
        load[i] += size
        out.append(streams[i])
    return out


def dequantized_weights(model: nn.Module, prefix: str = "") -> dict[str, mx.array]:
    """{stage name: dequantized weight (out, in)} of every quantized linear, so that codec errors
    (the weights) and kernel errors (the activations) are told apart. ``prefix``: as in :func:`quantize`."""
    named = [(name, m) for path, m in model.named_modules()
             if isinstance(m, nn.QuantizedLinear) and (name := dequantized_name(prefix + path)) is not None]
    out = {}
    for (name, m), stream in zip(named, _spread([m.weight.size for _, m in named]), strict=True):
        out[name] = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits,
                                  mode=m.mode, dtype=mx.float32, stream=stream)
    return out
