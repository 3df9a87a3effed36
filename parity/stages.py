"""The stage table: every public stage, declared here and only here, in forward order (DESIGN.md).

Each stage names its tolerance class and where the HF reference produces it: a module path under
``Gemma4UnifiedForConditionalGeneration`` and how that module is read (``output``, ``input``,
``kwarg:NAME``, ``mask``, ``rope`` -- see ``reference.hf.HFRunner.hooks``), or a key of the HF image
processor's output (``processor``). The rmlx side produces the same name at its ``tap`` point.

Order: preprocessing, vision embedder, audio projection, token embedding, merged inputs, the two
masks (full first: the policies differ there first), every decoder layer, final norm, logits.
Independent branches (vision, audio, token embedding) are ordered by convention.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from rmlx.config import TextConfig
from rmlx.errors import InputError


@dataclass(frozen=True)
class Stage:
    name: str  # public name, e.g. "vision.patch_ln1", "layers.3.attn.q"
    tol: str  # tolerance class in parity.tolerances, e.g. "layernorm", "exact"
    hf: str  # module path or processor key
    read: str  # how the reference reads it (see module docstring)
    what: str = ""


_VE = "model.embed_vision"
VISION: tuple[Stage, ...] = (
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
)
AUDIO: tuple[Stage, ...] = (
    Stage("audio.soft_tokens", "projection", "model.embed_audio", "output",
          "raw 640-sample frames -> RMSNorm (no weight) -> Linear: (1, N, hidden)"),
)

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


def layer_stages(cfg: TextConfig, i: int) -> tuple[Stage, ...]:
    spec = cfg.layer(i)
    out = []
    for point, (tol, sub, read, what) in _LAYER.items():
        if spec.kv_shared and point in ("attn.k", "attn.v"):
            continue  # a "reuse" layer has no K/V of its own
        path = f"{_LM}.layers.{i}" + (f".{sub}" if sub else "")
        out.append(Stage(f"layers.{i}.{point}", tol, path, read, what))
    return tuple(out)


def text_stages(cfg: TextConfig) -> tuple[Stage, ...]:
    head = [Stage("text.embed_tokens", "embedding", f"{_LM}.embed_tokens", "output", "E[ids] * sqrt(hidden)"),
            Stage("text.inputs_embeds", "embedding", _LM, "kwarg:inputs_embeds",
                  "token embeddings with the soft tokens scattered into their slots")]
    for kind in ("full_attention", "sliding_attention"):
        if kind in cfg.layer_types:
            first = cfg.layer_types.index(kind)
            head.append(Stage(f"mask.{kind}", "mask", f"{_LM}.layers.{first}", "mask",
                              "boolean (B, L, L), True = may attend"))
    layers = [s for i in range(cfg.num_hidden_layers) for s in layer_stages(cfg, i)]
    tail = [Stage("text.norm", "norm", f"{_LM}.norm", "output", "final RMSNorm"),
            Stage("logits", "logits", "lm_head", "result", "tied lm_head, after the optional soft-cap")]
    return tuple(head + layers + tail)


_LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
            "mlp.down_proj")  # forward order within a layer


def weight_stage(name: str) -> Stage:
    """The dequantized weight of a quantized linear (``vision.patch_dense.weight``,
    ``layers.3.attn.q_proj.weight``): the reference encodes HF's weight with its own MX codec."""
    return Stage(name, "qweight", name, "quantized", "dequantized MXFP8 weight (out, in)")


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


def select(patterns: list[str] | None, stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """Stages whose name matches any glob in ``patterns`` (all when None), in forward order."""
    if not patterns:
        return stages
    picked = tuple(s for s in stages if any(fnmatch.fnmatchcase(s.name, p) for p in patterns))
    if not picked:
        raise InputError(f"--stages {' '.join(patterns)} matches no stage. "
                         "Note: run 'rmlx-parity stages' to list the stage names")
    return picked


def hook_points(stages: tuple[Stage, ...]) -> dict[str, tuple[str, str]]:
    """{stage name: (module path, read)} for the stages read through forward hooks."""
    return {s.name: (s.hf, s.read) for s in stages if s.read not in ("processor", "result", "quantized")}
