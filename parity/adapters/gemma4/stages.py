"""The Gemma 4 (SigLIP-style vision, ``model_type: gemma4``) stage table: every vision stage declared here,
in forward order; the text decoder's stages are the unified family's (``rmlx.nn.text`` is the same decoder,
at the same HF module paths under ``model.language_model``), so they are delegated to
``parity.adapters.gemma4_unified.stages``.

Each stage names its tolerance class and where HF produces it: a module path under
``Gemma4ForConditionalGeneration`` and how it is read (``reference.gemma4.hf.hooks``: ``output``,
``output_batched``, ``rope2d``, ...), or a key of the image processor's output (``processor``). The
rmlx side produces the same name at its ``tap`` point (``rmlx/models/gemma4``).

Tolerance classes (``parity/tolerances.py``): no class is specific to the encoder layers, so they take
the decoder's (``attention``, ``mlp``, ``residual``: fp32 2e-3 free-running, 2e-5 teacher-forced); the
pooler output and the standardised features take ``residual`` (the pooled residual stream, x sqrt(D)).
"""

from __future__ import annotations

import re

from parity.adapters.gemma4_unified import stages as unified
from parity.stages import Stage, with_ports
from rmlx.nn.config import TextConfig

# Where rmlx computes each vision stage (its ``tap`` call), one hop from this table to the code; the text
# stages point into the shared decoder (``parity.adapters.gemma4_unified.stages.PORTS``).
PORTS = {
    "image.pixel_values": "rmlx.models.gemma4.image:preprocess_batch",
    "image.position_ids": "rmlx.models.gemma4.image:preprocess_batch",
    "vision.patch_embed": "rmlx.models.gemma4.vision:PatchEmbedder.__call__",
    "vision.pos_embed": "rmlx.models.gemma4.vision:PatchEmbedder.__call__",
    "vision.layers.{i}.attn.q": "rmlx.models.gemma4.vision:VisionAttention.__call__",
    "vision.layers.{i}.attn.k": "rmlx.models.gemma4.vision:VisionAttention.__call__",
    "vision.layers.{i}.attn.v": "rmlx.models.gemma4.vision:VisionAttention.__call__",
    "vision.layers.{i}.attn.out": "rmlx.models.gemma4.vision:VisionAttention.__call__",
    "vision.layers.{i}.mlp.out": "rmlx.models.gemma4.vision:VisionEncoderLayer.__call__",
    "vision.layers.{i}.out": "rmlx.models.gemma4.vision:VisionEncoderLayer.__call__",
    "vision.pooled": "rmlx.models.gemma4.vision:VisionModel.pool",
    "vision.standardized": "rmlx.models.gemma4.vision:VisionModel.standardize",
    "vision.soft_tokens": "rmlx.models.gemma4.model:Model.image_features",
    "text.embed_tokens": "rmlx.models.gemma4.model:Model.embed_inputs",
    "text.inputs_embeds": "rmlx.models.gemma4.model:Model.embed_inputs",
    "mask.full_attention": "rmlx.models.gemma4_unified.model:decoder_masks",
    "mask.sliding_attention": "rmlx.models.gemma4_unified.model:decoder_masks",
}

_VT = "model.vision_tower"
HEAD: tuple[Stage, ...] = with_ports((
    Stage("image.pixel_values", "exact", "pixel_values", "processor",
          "p x p x 3 HWC patches in [0, 1], raster order, padded with zero rows to max_soft_tokens * k^2"),
    Stage("image.position_ids", "exact", "image_position_ids", "processor",
          "(x, y) of every patch; (-1, -1) on padding rows"),
    Stage("vision.patch_embed", "dense", f"{_VT}.patch_embedder.input_proj", "output",
          "input_proj(2 (x - 0.5)), no bias"),
    Stage("vision.pos_embed", "posemb", f"{_VT}.patch_embedder", "output",
          "patch embedding + table[0][x] + table[1][y] (0 on padding rows)"),
), PORTS)
TAIL: tuple[Stage, ...] = with_ports((
    Stage("vision.pooled", "residual", f"{_VT}.pooler", "output",
          "padding zeroed, k x k cells averaged by position, * sqrt(hidden): (B, max_soft_tokens, D)"),
    Stage("vision.standardized", "residual", _VT, "output_batched",
          "empty cells dropped, (x - std_bias) * std_scale: (1, N, D)"),
    Stage("vision.soft_tokens", "projection", "model.embed_vision", "output_batched",
          "weightless RMSNorm, Linear(D -> hidden): (1, N, hidden)"),
), PORTS)
_LAYER = {  # point -> (tolerance class, module under the encoder layer, read, what)
    "attn.q": ("attention", "self_attn.q_norm", "rope2d", "q after q_norm and axial 2-D RoPE, (B, P, heads, d)"),
    "attn.k": ("attention", "self_attn.k_norm", "rope2d", "k after k_norm and axial 2-D RoPE, (B, P, kv, d)"),
    "attn.v": ("attention", "self_attn.v_norm", "output", "v after the weightless v_norm, (B, P, kv, d)"),
    "attn.out": ("attention", "self_attn", "output", "o_proj output (clipped linear)"),
    "mlp.out": ("mlp", "mlp", "output", "down(gelu_tanh(gate(x)) * up(x)), clipped linears"),
    "out": ("residual", "", "output", "the encoder layer's output"),
}


def vision_layer_stage(i: int, point: str) -> Stage:
    tol, sub, read, what = _LAYER[point]
    return Stage(f"vision.layers.{i}.{point}", tol, f"{_VT}.encoder.layers.{i}" + (f".{sub}" if sub else ""),
                 read, what, PORTS["vision.layers.{i}." + point])


def vision_stages(layers: int, standardize: bool) -> tuple[Stage, ...]:
    body = tuple(vision_layer_stage(i, point) for i in range(layers) for point in _LAYER)
    return HEAD + body + tuple(s for s in TAIL if standardize or s.name != "vision.standardized")


def stages_for(text: TextConfig, vision_layers: int | None, standardize: bool, image: bool,
               quantized: frozenset[str] = frozenset()) -> tuple[Stage, ...]:
    """The stages of one case in forward order: the vision path (when the case has an image), then the
    text decoder's (the unified table: embeddings, masks, layers, norm, logits, dequantized weights)."""
    vision = vision_stages(vision_layers, standardize) if image and vision_layers is not None else ()
    return vision + with_ports(unified.stages_for(text, False, False, quantized), PORTS)


# Stage names without a model config (dumps of other ports): the vision names here, the rest unified.

_VISION_LAYER = re.compile(r"vision\.layers\.(0|[1-9][0-9]*)\.(.+)")
_FIXED = {s.name: s for s in HEAD + TAIL}
# forward order, consistent with the unified keys where the names are shared (pixel_values (0, 0, 0),
# position_ids (0, 1, 0), pos_embed (0, 6, 0), soft_tokens (0, 9, 0)); the encoder layers sit after
# pos_embed, the pooler and standardisation before soft_tokens
_ORDER = {"image.pixel_values": (0, 0, 0), "image.position_ids": (0, 1, 0), "vision.patch_embed": (0, 4, 0),
          "vision.pos_embed": (0, 6, 0), "vision.pooled": (0, 8, 0), "vision.standardized": (0, 8, 1),
          "vision.soft_tokens": (0, 9, 0)}
_POINT_ORDER = {p: j for j, p in enumerate(_LAYER)}


def classify(name: str) -> Stage | None:
    if name in _FIXED:
        return _FIXED[name]
    m = _VISION_LAYER.fullmatch(name)
    if m is not None:
        return vision_layer_stage(int(m[1]), m[2]) if m[2] in _LAYER else None
    if name.startswith(("vision.", "audio.")):
        return None  # the unified vision/audio names are not stages of this family
    stage = unified.classify(name)
    return None if stage is None else with_ports((stage,), PORTS)[0]


def order_key(name: str) -> tuple | None:
    if name in _ORDER:
        return _ORDER[name]
    m = _VISION_LAYER.fullmatch(name)
    if m is not None:
        return (0, 6, 1 + int(m[1]), _POINT_ORDER[m[2]]) if m[2] in _POINT_ORDER else None
    if name.startswith(("vision.", "audio.")):
        return None
    return unified.order_key(name)
