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

from rmlx.errors import InputError

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

    nn.quantize(model, mode=mode, class_predicate=predicate, **MODES[mode])
    return status


def dequantized_weights(model: nn.Module, prefix: str = "") -> dict[str, mx.array]:
    """{stage name: dequantized weight (out, in)} of every quantized linear, so that codec errors
    (the weights) and kernel errors (the activations) are told apart. ``prefix``: as in :func:`quantize`."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            name = dequantized_name(prefix + path)
            if name is not None:
                out[name] = mx.dequantize(module.weight, module.scales, module.get("biases"),
                                          group_size=module.group_size, bits=module.bits, mode=module.mode,
                                          dtype=mx.float32)
    return out
