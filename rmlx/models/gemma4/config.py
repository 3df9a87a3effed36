"""Configuration of a ``model_type: "gemma4"`` checkpoint (HF ``Gemma4Config``), text + SigLIP-style vision.

Field names are the HF names. Shape-defining keys are required (a missing one is an error naming it);
keys HF gives a default to take HF's default (transformers 5.24 ``configuration_gemma4.py``).

The text decoder is ``rmlx.nn.text.TextModel``: :func:`text_config` builds its ``rmlx.nn.config.TextConfig``
from the gemma4 ``text_config`` after refusing every gemma4-only feature the unified decoder does not
compute (per-layer input embeddings, MoE blocks, fully bidirectional attention, attention biases).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmlx.errors import InputError
from rmlx.nn.config import MAX_ID, MAX_LAYERS, TextConfig, _bool, _float, _int, read_config

# HF Gemma4TextConfig default values that differ from what rmlx.nn.config.TextConfig.from_dict assumes for a
# missing key (it follows gemma4_unified): a gemma4 config.json without them must mean HF's value.
_TEXT_DEFAULTS = {"sliding_window": 512, "use_bidirectional_attention": None}
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


def _require(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise InputError(f"{where}: missing required key '{key}'")
    return d[key]


def text_config(d: dict, where: str = "text_config") -> TextConfig:
    """A gemma4 ``text_config`` dict -> the ``rmlx.nn.config.TextConfig`` of the same decoder.

    Gemma4TextModel computes what ``rmlx.nn.text.TextModel`` computes when: no per-layer input embeddings
    (``hidden_size_per_layer_input`` 0 or null), no MoE block (``enable_moe_block`` false), no
    attention biases, ``use_bidirectional_attention`` null or "vision" ("all" also halves the sliding
    window and drops causality). Anything else is refused here, naming the field.
    """
    ple = d.get("hidden_size_per_layer_input", 256)  # HF default 256: PLE is on unless the config says 0
    if ple:
        raise InputError(f"{where}: hidden_size_per_layer_input={ple}: per-layer input embeddings (PLE) "
                         "are not ported; only 0 or null is supported")
    if d.get("enable_moe_block", False):
        raise InputError(f"{where}: enable_moe_block=true: the MoE feed-forward block is not ported")
    if d.get("attention_bias", False):
        raise InputError(f"{where}: attention_bias=true: biased attention projections are not supported")
    if d.get("use_bidirectional_attention") == "all":
        raise InputError(f"{where}: use_bidirectional_attention='all' (non-causal text) is not supported")
    if d.get("model_type", "gemma4_text") != "gemma4_text":
        raise InputError(f"{where}: model_type is {d.get('model_type')!r}, expected 'gemma4_text'")
    return TextConfig.from_dict({**_TEXT_DEFAULTS, **d}, where)


@dataclass(frozen=True)
class VisionConfig:
    """HF ``Gemma4VisionConfig`` (the fields the forward reads)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10 * 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    use_clipped_linears: bool = False
    standardize: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, d: dict, where: str = "vision_config") -> VisionConfig:
        if d.get("model_type", "gemma4_vision") != "gemma4_vision":
            raise InputError(f"{where}: model_type is {d.get('model_type')!r}, expected 'gemma4_vision'")
        rope = d.get("rope_parameters") or {"rope_type": "axial", "rope_theta": 100.0}
        if rope.get("rope_type", "axial") != "axial":
            raise InputError(f"{where}: rope_parameters.rope_type={rope.get('rope_type')!r}: the vision "
                             "encoder supports only 'axial' (as HF)")
        hidden = _int(d, "hidden_size", where)
        heads = _int(d, "num_attention_heads", where)
        head_dim = d.get("head_dim") or hidden // heads  # HF: getattr(config, "head_dim", hidden // heads)
        return cls(
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size", where),
            num_hidden_layers=_int(d, "num_hidden_layers", where, hi=MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=_int(d, "num_key_value_heads", where),
            head_dim=int(head_dim),
            patch_size=_int(d, "patch_size", where, 16),
            pooling_kernel_size=_int(d, "pooling_kernel_size", where, 3),
            position_embedding_size=_int(d, "position_embedding_size", where, 10 * 1024),
            rms_norm_eps=_float(d, "rms_norm_eps", where, 1e-6),
            rope_theta=float(rope.get("rope_theta", 100.0)),
            use_clipped_linears=_bool(d, "use_clipped_linears", where, False),
            standardize=_bool(d, "standardize", where, False),
            hidden_activation=str(d.get("hidden_activation", "gelu_pytorch_tanh")),
        )

    def __post_init__(self):
        if self.head_dim % 4:
            # 2-D RoPE: each axis rotates half the head as (i, i + d/4) pairs, so d/4 must be whole
            raise InputError(f"vision_config: head_dim={self.head_dim} must be a multiple of 4 (axial 2-D RoPE)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(f"vision_config: num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_activation not in _ACTIVATIONS:
            raise InputError(f"vision_config: unsupported hidden_activation '{self.hidden_activation}'")
        if self.patch_size < 1:
            raise InputError(f"vision_config: patch_size={self.patch_size} must be positive")
        if self.pooling_kernel_size < 2:
            # HF 5.24 skips the pooling at k = 1 and then keeps the rows its *padding* mask marks (the
            # pooler returns padding_positions where the caller expects True = valid): no reference to match
            raise InputError(f"vision_config: pooling_kernel_size={self.pooling_kernel_size} is not supported "
                             "(HF's pooler drops the valid patches at 1); need >= 2")

    @property
    def patch_dim(self) -> int:  # one flattened patch: patch_size^2 pixels x 3 channels (HWC)
        return 3 * self.patch_size**2


@dataclass(frozen=True)
class ModelArgs:
    text: TextConfig
    vision: VisionConfig | None
    image_token_id: int = 258_880
    video_token_id: int = 258_884
    audio_token_id: int = 258_881
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    tie_word_embeddings: bool = True
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> ModelArgs:
        if d.get("model_type") != "gemma4":
            raise InputError(f"{where}: model_type is {d.get('model_type')!r}, expected 'gemma4'")
        if d.get("audio_config"):
            raise InputError(f"{where}: audio_config is set: the gemma4 audio conformer is not ported")
        vision = d.get("vision_config")
        return cls(
            text=text_config(_require(d, "text_config", where), f"{where}: text_config"),
            vision=VisionConfig.from_dict(vision, f"{where}: vision_config") if vision else None,
            image_token_id=_int(d, "image_token_id", where, 258_880, lo=0, hi=MAX_ID),
            video_token_id=_int(d, "video_token_id", where, 258_884, lo=0, hi=MAX_ID),
            audio_token_id=_int(d, "audio_token_id", where, 258_881, lo=0, hi=MAX_ID),
            boi_token_id=_int(d, "boi_token_id", where, 255_999, lo=0, hi=MAX_ID),
            eoi_token_id=_int(d, "eoi_token_id", where, 258_882, lo=0, hi=MAX_ID),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", where, True),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        return read_config(path, cls.from_dict)
