"""The Gemma 4 unified stage table: every public stage, declared here and only here, in forward order.

Each stage names its tolerance class and where the HF reference produces it: a module path under
``Gemma4UnifiedForConditionalGeneration`` and how that module is read (``output``, ``input``,
``kwarg:NAME``, ``mask``, ``rope`` -- see ``reference.gemma4_unified.hf.HFRunner.hooks``), or a key of the HF image
processor's output (``processor``). The rmlx side produces the same name at its ``tap`` point.

Order: preprocessing, vision embedder, audio projection, token embedding, merged inputs, the two
masks (full first: the policies differ there first), every decoder layer, final norm, logits.
Independent branches (vision, audio, token embedding) are ordered by convention.
"""

from __future__ import annotations

import re

from parity.stages import Stage, with_ports
from rmlx.nn.config import TextConfig

# Where rmlx computes each stage (its ``tap`` call), one hop from this table to the code.
PORTS = {
    "image.pixel_values": "rmlx.models.gemma4_unified.image:preprocess_batch",
    "image.position_ids": "rmlx.models.gemma4_unified.image:preprocess_batch",
    "vision.patch_ln1": "rmlx.models.gemma4_unified.vision:VisionEmbedder.__call__",
    "vision.patch_dense": "rmlx.models.gemma4_unified.vision:VisionEmbedder.__call__",
    "vision.patch_ln2": "rmlx.models.gemma4_unified.vision:VisionEmbedder.__call__",
    "vision.pos_embed": "rmlx.models.gemma4_unified.vision:VisionEmbedder.position_embedding",
    "vision.pos_norm": "rmlx.models.gemma4_unified.vision:VisionEmbedder.__call__",
    "vision.mm_prenorm": "rmlx.models.gemma4_unified.vision:VisionEmbedder.__call__",
    "vision.soft_tokens": "rmlx.models.gemma4_unified.vision:VisionEmbedder.__call__",
    "audio.soft_tokens": "rmlx.models.gemma4_unified.model:AudioEmbedder.__call__",
    "text.embed_tokens": "rmlx.models.gemma4_unified.model:Model.embed_inputs",
    "text.inputs_embeds": "rmlx.models.gemma4_unified.model:Model.embed_inputs",
    "mask.full_attention": "rmlx.models.gemma4_unified.model:decoder_masks",
    "mask.sliding_attention": "rmlx.models.gemma4_unified.model:decoder_masks",
    "layers.{i}.input_layernorm": "rmlx.nn.text:DecoderLayer.__call__",
    "layers.{i}.attn.q": "rmlx.nn.text:Attention.__call__",
    "layers.{i}.attn.k": "rmlx.nn.text:Attention.__call__",
    "layers.{i}.attn.v": "rmlx.nn.text:Attention.v_norm",
    "layers.{i}.attn.out": "rmlx.nn.text:attention",
    "layers.{i}.mlp.out": "rmlx.nn.text:MLP.__call__",
    "layers.{i}.out": "rmlx.nn.text:DecoderLayer.__call__",
    "text.norm": "rmlx.nn.text:TextModel.head",
    "logits": "rmlx.nn.text:TextModel.head",
}

_VE = "model.embed_vision"
VISION: tuple[Stage, ...] = with_ports((
    Stage("image.pixel_values", "exact", "pixel_values", "processor",
          "48x48x3 HWC patches in raster order, padded with zero rows to max_soft_tokens"),
    Stage("image.position_ids", "exact", "image_position_ids", "processor",
          "(x, y) of every patch; (-1, -1) on padding rows"),
    Stage("vision.patch_ln1", "layernorm", f"{_VE}.patch_ln1", "output", "LayerNorm(6912), eps 1e-5"),
    Stage("vision.patch_dense", "dense", f"{_VE}.patch_dense", "output", "Linear(6912 -> mm) + bias"),
    Stage("vision.patch_ln2", "layernorm", f"{_VE}.patch_ln2", "output", "LayerNorm(mm), eps 1e-5"),
    Stage("vision.pos_embed", "posemb", f"{_VE}.pos_norm", "input",
          "after adding table[x, 0] + table[y, 1] (the input of pos_norm)"),
    Stage("vision.pos_norm", "layernorm", f"{_VE}.pos_norm", "output", "LayerNorm(mm), eps 1e-5"),
    Stage("vision.mm_prenorm", "rmsnorm", f"{_VE}.multimodal_embedder.embedding_pre_projection_norm", "output",
          "RMSNorm without weight, eps 1e-6"),
    Stage("vision.soft_tokens", "projection", f"{_VE}.multimodal_embedder.embedding_projection", "output",
          "Linear(mm -> hidden), padding rows dropped, images concatenated: (1, N, hidden)"),
), PORTS)
AUDIO: tuple[Stage, ...] = with_ports((
    Stage("audio.soft_tokens", "projection", "model.embed_audio", "output",
          "raw 640-sample frames -> RMSNorm (no weight) -> Linear: (1, N, hidden)"),
), PORTS)

_LM = "model.language_model"
_LAYER = {  # point -> (tolerance class, module under the layer, read, what)
    "input_layernorm": ("norm", "input_layernorm", "output", "RMSNorm x_hat * w"),
    "attn.q": ("attention", "self_attn.q_norm", "rope", "q after q_norm and RoPE, (B, L, heads, d)"),
    "attn.k": ("attention", "self_attn.k_norm", "rope", "k after k_norm and RoPE, (B, L, kv_heads, d)"),
    "attn.v": ("attention", "self_attn.v_norm", "output", "v after the weightless v_norm, (B, L, kv_heads, d)"),
    "attn.out": ("attention", "self_attn", "output", "o_proj output"),
    "mlp.out": ("mlp", "mlp", "output", "down(gelu_tanh(gate(x)) * up(x))"),
    "out": ("residual", "", "output", "the layer's output, after * layer_scalar"),
}


def _layer_stage(i: int, point: str) -> Stage:
    tol, sub, read, what = _LAYER[point]
    path = f"{_LM}.layers.{i}" + (f".{sub}" if sub else "")
    return Stage(f"layers.{i}.{point}", tol, path, read, what, PORTS["layers.{i}." + point])


def layer_stages(cfg: TextConfig, i: int) -> tuple[Stage, ...]:
    spec = cfg.layer(i)
    # a "reuse" (KV-shared) layer has no K/V of its own
    return tuple(_layer_stage(i, point) for point in _LAYER
                 if not (spec.kv_shared and point in ("attn.k", "attn.v")))


TEXT_HEAD: tuple[Stage, ...] = with_ports((
    Stage("text.embed_tokens", "embedding", f"{_LM}.embed_tokens", "output", "E[ids] * sqrt(hidden)"),
    Stage("text.inputs_embeds", "embedding", _LM, "kwarg:inputs_embeds",
          "token embeddings with the soft tokens scattered into their slots"),
), PORTS)
MASK_KINDS = ("full_attention", "sliding_attention")  # forward order: the policies differ at full first
TEXT_TAIL: tuple[Stage, ...] = with_ports((
    Stage("text.norm", "norm", f"{_LM}.norm", "output", "final RMSNorm"),
    Stage("logits", "logits", "lm_head", "result", "tied lm_head, after the optional soft-cap"),
), PORTS)


def mask_stage(kind: str, first: int | None) -> Stage:
    """``mask.{kind}``, read at the first layer of that kind (None: unknown, e.g. from a dump)."""
    return Stage(f"mask.{kind}", "mask", f"{_LM}.layers.{first}" if first is not None else f"{_LM}.layers", "mask",
                 "boolean (B, L, L), True = may attend", PORTS[f"mask.{kind}"])


def text_stages(cfg: TextConfig) -> tuple[Stage, ...]:
    masks = [mask_stage(kind, cfg.layer_types.index(kind)) for kind in MASK_KINDS if kind in cfg.layer_types]
    layers = [s for i in range(cfg.num_hidden_layers) for s in layer_stages(cfg, i)]
    return TEXT_HEAD + tuple(masks + layers) + TEXT_TAIL


_LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
            "mlp.down_proj")  # forward order within a layer


def weight_stage(name: str) -> Stage:
    """The dequantized weight of a quantized linear (``vision.patch_dense.weight``,
    ``layers.3.attn.q_proj.weight``): the reference encodes HF's weight with its own MX codec."""
    return Stage(name, "qweight", name, "quantized", "dequantized MXFP8 weight (out, in)",
                 "rmlx.nn.quant:dequantized_weights")


def stages_for(cfg: TextConfig, image: bool, audio: bool, quantized: frozenset[str] = frozenset()
               ) -> tuple[Stage, ...]:
    """The stages of one case, in forward order. ``quantized``: names of dequantized-weight stages;
    each goes right before the first stage that uses its weight."""
    out = []
    for s in (VISION if image else ()) + (AUDIO if audio else ()) + text_stages(cfg):
        if s.name == "vision.patch_dense" and "vision.patch_dense.weight" in quantized:
            out.append(weight_stage("vision.patch_dense.weight"))
        if s.name.endswith(".attn.q") and s.name.startswith("layers."):
            layer = s.name[: -len(".attn.q")]
            out += [weight_stage(f"{layer}.{w}.weight") for w in _LINEARS if f"{layer}.{w}.weight" in quantized]
        out.append(s)
    return tuple(out)


# Stage names without a model config: dumps written by another implementation (`rmlx-parity compare`).

_LAYER_NAME = re.compile(r"layers\.(0|[1-9][0-9]*)\.(.+)")  # canonical index: no sign, no leading zero
_WEIGHTS_IN_LAYER = tuple(f"{w}.weight" for w in _LINEARS)
# within a layer, forward order: the dequantized weights go right before attn.q (as in stages_for)
_LAYER_ORDER = {p: i for i, p in enumerate(("input_layernorm", *_WEIGHTS_IN_LAYER, *tuple(_LAYER)[1:]))}
_HEAD_ORDER = {n: i for i, n in enumerate(
    [s.name for s in VISION[:3]] + ["vision.patch_dense.weight"] + [s.name for s in VISION[3:] + AUDIO + TEXT_HEAD]
    + [f"mask.{kind}" for kind in MASK_KINDS])}
_TAIL_ORDER = {s.name: i for i, s in enumerate(TEXT_TAIL)}
_FIXED = {s.name: s for s in VISION + AUDIO + TEXT_HEAD + TEXT_TAIL}


def classify(name: str) -> Stage | None:
    """The stage a public name denotes, from the name alone (no config): a fixed vision, audio or text
    stage, ``mask.{full,sliding}_attention``, ``layers.{i}.<point>``, or a dequantized weight
    (``vision.patch_dense.weight``, ``layers.{i}.<linear>.weight``). None: not in the vocabulary."""
    if name in _FIXED:
        return _FIXED[name]
    if name == "vision.patch_dense.weight":
        return weight_stage(name)
    if name.startswith("mask.") and name[len("mask."):] in MASK_KINDS:
        return mask_stage(name[len("mask."):], None)
    m = _LAYER_NAME.fullmatch(name)
    if m is None:
        return None
    if m[2] in _LAYER:
        return _layer_stage(int(m[1]), m[2])
    return weight_stage(name) if m[2] in _WEIGHTS_IN_LAYER else None


def order_key(name: str) -> tuple[int, int, int] | None:
    """Sort key putting stage names in forward order (the order of ``stages_for``; layer indices
    compare as numbers). None: not a name of this family."""
    if name in _HEAD_ORDER:
        return (0, _HEAD_ORDER[name], 0)
    if name in _TAIL_ORDER:
        return (2, _TAIL_ORDER[name], 0)
    m = _LAYER_NAME.fullmatch(name)
    if m is not None and m[2] in _LAYER_ORDER:
        return (1, int(m[1]), _LAYER_ORDER[m[2]])
    return None
