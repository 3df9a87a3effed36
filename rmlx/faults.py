"""Planted defects: real-world porting bugs the parity harness must catch and localise.

Each fault imitates a bug someone shipped; the port checks ``active(name)`` at the one place the
bug would live. Switch them on with any of (they combine):

* the context manager ``with faults.inject("bgr-patchify"): ...``
* the environment variable ``RMLX_INJECT=bgr-patchify[,other]`` (read at import)
* the CLI flag ``rmlx-parity run --inject bgr-patchify`` (uses the context manager)

Off by default; when off, ``active`` is one frozenset lookup.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rmlx.errors import InputError


@dataclass(frozen=True)
class Fault:
    name: str
    area: str  # where the bug lives: preprocessing, embedder, masks, rope, attention, ...
    imitates: str  # the real-world bug, in one line
    stage: str  # the public stage it must first hit (teacher-forced): a name or glob; "{first_full}" stands for
    #             the model's first full-attention layer, "{first_qweight}" for the case's first dequantized
    #             weight stage; "logits@decode.N" is a decode step; "load": the strict loader refuses the
    #             checkpoint, naming ``load_error``
    settings: tuple[tuple[str, object], ...] = ()  # run settings the defect needs to show, e.g. quantize
    load_error: str = ""


_MX = (("quantize", "mxfp8"),)
_MX_STAGE = "{first_qweight}"  # the first dequantized weight of the case, in forward order
CATALOG: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault("bgr-patchify", "preprocessing",
              "image decoded as BGR (OpenCV habit): patches carry B,G,R instead of R,G,B", "image.pixel_values"),
        Fault("patch-ln1-eps", "embedder",
              "patch_ln1 built with the RMSNorm eps 1e-6 instead of LayerNorm's 1e-5", "vision.patch_ln1"),
        Fault("posemb-xy-swap", "embedder",
              "factorised position embedding indexed (y, x) instead of (x, y)", "vision.pos_embed"),
        Fault("soft-token-scatter-shifted", "embedder",
              "image soft tokens scattered from <boi> inclusive: every token one slot late", "text.inputs_embeds"),
        Fault("embed-scale-missing", "embedder",
              "token embeddings not multiplied by sqrt(hidden_size) (a Llama-style embedding)", "text.embed_tokens"),
        Fault("audio-rmsnorm-skipped", "audio",
              "audio frames projected without the weightless RMSNorm before embedding_projection",
              "audio.soft_tokens"),
        Fault("vision-causal", "masks", "image soft tokens attended causally, not bidirectionally within their "
              "image (the motivating bug)", "mask.*"),
        Fault("overlay-crosses-blocks", "masks",
              "the bidirectional image overlay spans every image of the prompt as one block", "mask.*"),
        Fault("rope-partial-slice", "rope", "proportional RoPE applied as mx.fast.rope(dims=128) on a slice: "
              "pairs (i, i+64), exponent over 128", "layers.{first_full}.attn.q"),
        Fault("rope-interleaved", "rope",
              "RoPE pairs interleaved (2i, 2i+1), GPT-J style (mx.fast.rope traditional=True), instead of "
              "half-split (i, i + d/2)", "layers.0.attn.q"),
        Fault("attn-scale-rsqrt", "attention",
              "attention scores scaled by 1/sqrt(head_dim), which Gemma 4 drops (scale 1.0 after QK-norm)",
              "layers.0.attn.out"),
        Fault("v-norm-skipped", "norms", "values not passed through the weightless v_norm", "layers.0.attn.v"),
        Fault("rmsnorm-one-plus-w", "norms",
              "Gemma 1-3 RMSNorm convention x_hat * (1 + w) instead of Gemma 4's x_hat * w",
              "layers.0.input_layernorm"),
        Fault("mlp-gelu-exact", "mlp", "MLP gate activation exact erf GELU instead of gelu_pytorch_tanh",
              "layers.0.mlp.out"),
        Fault("layer-scalar-ignored", "residual",
              "the per-layer layer_scalar buffer never applied to the layer output", "layers.0.out"),
        Fault("softcap-skipped", "logits", "final logit soft-cap tanh(x / cap) * cap left out", "logits"),
        Fault("sliding-cache-off-by-one", "cache", "the rotating KV cache keeps W keys instead of W - 1, so a "
              "decode step sees W + 1 keys: only decoding with a cache shows it", "logits@decode.*"),
        Fault("gate-up-swapped", "loader", "checkpoint gate_proj and up_proj loaded into each other's slots "
              "(a fused gate_up split in the wrong order): same shapes, so no shape check sees it",
              "layers.0.mlp.out"),
        Fault("k-eq-v-ignored", "loader", "attention_k_eq_v ignored: full layers built with their own v_proj, "
              "which the checkpoint does not have", "load", load_error="self_attn.v_proj.weight"),
        Fault("mx-scale-exponent-off-by-one", "quantization", "MXFP8 E8M0 scale exponent off by one (bias 127 vs "
              "126): every block decoded at twice its value", _MX_STAGE, _MX),
        Fault("mx-scales-shifted-block", "quantization",
              "MXFP8 scales applied to the wrong block (block j uses block j-1's scale)",
              _MX_STAGE, _MX),
        Fault("mx-e5m2", "quantization", "MXFP8 elements encoded as FP8 E5M2 instead of E4M3",
              _MX_STAGE, _MX),
    )
}


def expected_stage(fault: Fault, layer_types: list[str], stage_names: list[str]) -> str:
    """``fault.stage`` for one case: its placeholders resolved from the model's layer types and the
    case's stage names (forward order)."""
    stage = fault.stage
    if "{first_full}" in stage:
        stage = stage.replace("{first_full}", str(layer_types.index("full_attention")))
    if "{first_qweight}" in stage:
        stage = stage.replace("{first_qweight}", next((n for n in stage_names if n.endswith(".weight")), "?"))
    return stage


def matches(stage: str, expected: str) -> bool:
    """Is ``stage`` the stage a fault declares (a resolved ``Fault.stage``, possibly a glob)?"""
    return fnmatch.fnmatchcase(stage, expected)


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
