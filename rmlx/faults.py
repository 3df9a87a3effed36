"""Planted defects: real-world porting bugs the parity harness must catch and localise.

Each fault imitates a bug someone shipped; the port checks ``active(name)`` at the one place the
bug would live. Switch them on with exactly one of:

* the context manager ``with faults.inject("bgr-patchify"): ...``
* the environment variable ``RMLX_INJECT=bgr-patchify[,other]`` (read at import)
* the CLI flag ``rmlx-parity run --inject bgr-patchify`` (uses the context manager)

Off by default; when off, ``active`` is one frozenset lookup.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rmlx.errors import InputError


@dataclass(frozen=True)
class Fault:
    name: str
    imitates: str  # the real-world bug, in one line
    stage: str  # the public stage it must first hit (teacher-forced); a glob where it depends on the model


CATALOG: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault("bgr-patchify", "image decoded as BGR (OpenCV habit): patches carry B,G,R instead of R,G,B",
              "image.pixel_values"),
        Fault("patch-ln1-eps", "patch_ln1 built with the RMSNorm eps 1e-6 instead of LayerNorm's 1e-5",
              "vision.patch_ln1"),
        Fault("posemb-xy-swap", "factorised position embedding indexed (y, x) instead of (x, y)",
              "vision.pos_embed"),
        Fault("vision-causal", "image soft tokens attended causally, not bidirectionally within their image "
              "(the motivating bug)", "mask.*"),
        Fault("overlay-crosses-blocks", "the bidirectional image overlay spans every image of the prompt as one "
              "block", "mask.*"),
        Fault("rope-partial-slice", "proportional RoPE applied as mx.fast.rope(dims=128) on a slice: pairs "
              "(i, i+64), exponent over 128", "layers.*.attn.q"),
        Fault("rmsnorm-one-plus-w", "Gemma 1-3 RMSNorm convention x_hat * (1 + w) instead of Gemma 4's x_hat * w",
              "layers.0.input_layernorm"),
        Fault("softcap-skipped", "final logit soft-cap tanh(x / cap) * cap left out", "logits"),
        Fault("sliding-cache-off-by-one", "the rotating KV cache keeps W keys instead of W - 1, so a decode step "
              "sees W + 1 keys: only decoding with a cache shows it", "logits"),
        Fault("mx-scale-exponent-off-by-one", "MXFP8 E8M0 scale exponent off by one (bias 127 vs 126): every "
              "block decoded at twice its value", "vision.patch_dense.weight"),
        Fault("mx-scales-shifted-block", "MXFP8 scales applied to the wrong block (block j uses block j-1's "
              "scale)", "vision.patch_dense.weight"),
        Fault("mx-e5m2", "MXFP8 elements encoded as FP8 E5M2 instead of E4M3", "vision.patch_dense.weight"),
        Fault("k-eq-v-ignored", "attention_k_eq_v ignored: full layers built with their own v_proj, which the "
              "checkpoint does not have", "load (exit 2, names the missing v_proj)"),
    )
}


def _parse(spec: str, origin: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in spec.split(",") if n.strip())
    unknown = sorted(names - CATALOG.keys())
    if unknown:
        raise InputError(f"{origin}: unknown fault(s) {unknown}; known: {sorted(CATALOG)}")
    return names


_active: frozenset[str] = _parse(os.environ.get("RMLX_INJECT", ""), "RMLX_INJECT")


def check(*names: str) -> frozenset[str]:
    """Validate fault names (an ``InputError`` lists the known ones) without switching anything on."""
    return _parse(",".join(names), "inject")


def active(name: str) -> bool:
    """Is the planted defect ``name`` switched on?"""
    return name in _active


def enabled() -> frozenset[str]:
    return _active


@contextmanager
def inject(*names: str) -> Iterator[None]:
    """Switch the named faults on for the duration of the block."""
    global _active
    previous = _active
    _active = previous | check(*names)
    try:
        yield
    finally:
        _active = previous
