"""Model configuration read from an HF `config.json` (model_type `gemma4_unified`).

Field names are the HF names. Shape-defining keys are required (a missing one is an error naming
it); keys HF gives a default to take HF's default (catalog §5).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rmlx.errors import InputError

T = TypeVar("T")

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)

_DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def _require(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise InputError(f"{where}: missing required key '{key}'")
    return d[key]


_REQUIRED = object()
# Upper bounds far above any Gemma 4 (12B: hidden 3840, vocabulary 262144, 48 layers) that stop a
# config from asking for an absurd allocation before a tensor is read.
MAX_DIM, MAX_VOCAB, MAX_LAYERS, MAX_ID = 1 << 17, 1 << 22, 1024, (1 << 31) - 1


def _int(d: dict, key: str, where: str, default: Any = _REQUIRED, lo: int = 1, hi: int = MAX_DIM) -> int:
    """An integer config value, strictly: JSON integers only (not "4", 128.9 or true), within [lo, hi]."""
    if key not in d or d[key] is None:
        if default is _REQUIRED:
            raise InputError(f"{where}: missing required key '{key}'")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputError(f"{where}: '{key}' must be an integer, got {v!r} ({type(v).__name__})")
    if not lo <= v <= hi:
        raise InputError(f"{where}: '{key}' = {v} is out of range [{lo}, {hi}]")
    return v


def _float(d: dict, key: str, where: str, default: float | None) -> float | None:
    """A positive finite real config value (or ``default`` when absent or null)."""
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not (0 < v < float("inf")):
        raise InputError(f"{where}: '{key}' must be a positive finite number, got {v!r}")
    return float(v)


def _bool(d: dict, key: str, where: str, default: bool) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InputError(f"{where}: '{key}' must be true or false, got {v!r}")
    return v


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer needs from the config (HF's resolved `per_layer_config[i]`)."""

    layer_type: str  # "sliding_attention" | "full_attention"
    head_dim: int
    num_key_value_heads: int
    kv_shared: bool  # True: a "reuse" layer (q_proj, q_norm, o_proj only)
    intermediate_size: int
    k_eq_v: bool  # full layer of an attention_k_eq_v model: no v_proj, V = raw K


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    per_layer_config: dict[int, dict[str, int]]
    rms_norm_eps: float = 1e-6
    sliding_window: int = 1024
    final_logit_softcapping: float | None = None
    rope_parameters: dict = field(default_factory=lambda: dict(_DEFAULT_ROPE))
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    use_bidirectional_attention: str | None = "vision"
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict, where: str = "text_config") -> TextConfig:
        n = _int(d, "num_hidden_layers", where, hi=MAX_LAYERS)
        layer_types = d.get("layer_types")
        if layer_types is None:  # HF's default pattern: every 6th layer full
            layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
        layer_types = list(layer_types)
        if len(layer_types) != n:
            raise InputError(f"{where}: 'layer_types' has {len(layer_types)} entries, num_hidden_layers is {n}")
        if layer_types[-1] != "full_attention":  # HF forces the last layer to full attention
            layer_types[-1] = "full_attention"
        bad = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if bad:
            raise InputError(f"{where}: unsupported layer type(s) {bad} in 'layer_types'")
        k_eq_v = _bool(d, "attention_k_eq_v", where, False)
        if "per_layer_config" in d:
            # Present (even as {} or null): used as is; HF drops entries equal to the base values.
            per_layer = {int(k): dict(v) for k, v in (d["per_layer_config"] or {}).items()}
        else:
            overrides = {"head_dim": _int(d, "global_head_dim", where, 512)}
            if k_eq_v and d.get("num_global_key_value_heads") is not None:
                overrides["num_key_value_heads"] = _int(d, "num_global_key_value_heads", where)
            per_layer = {i: dict(overrides) for i, t in enumerate(layer_types) if t == "full_attention"}
        rope = d.get("rope_parameters") or dict(_DEFAULT_ROPE)
        return cls(
            vocab_size=_int(d, "vocab_size", where, hi=MAX_VOCAB),
            hidden_size=_int(d, "hidden_size", where),
            intermediate_size=_int(d, "intermediate_size", where),
            num_hidden_layers=n,
            num_attention_heads=_int(d, "num_attention_heads", where),
            num_key_value_heads=_int(d, "num_key_value_heads", where),
            head_dim=_int(d, "head_dim", where),
            layer_types=tuple(layer_types),
            per_layer_config=per_layer,
            rms_norm_eps=_float(d, "rms_norm_eps", where, 1e-6),
            sliding_window=_int(d, "sliding_window", where, 1024),
            final_logit_softcapping=_float(d, "final_logit_softcapping", where, None),
            rope_parameters=rope,
            attention_k_eq_v=k_eq_v,
            num_kv_shared_layers=_int(d, "num_kv_shared_layers", where, 0, lo=0, hi=MAX_LAYERS),
            use_double_wide_mlp=_bool(d, "use_double_wide_mlp", where, False),
            use_bidirectional_attention=d.get("use_bidirectional_attention", "vision"),
            hidden_activation=d.get("hidden_activation", "gelu_pytorch_tanh"),
            pad_token_id=_int(d, "pad_token_id", where, 0, lo=0, hi=MAX_ID),
        )

    def __post_init__(self):
        if not 0 <= self.num_kv_shared_layers <= self.num_hidden_layers:
            raise InputError(f"text_config: num_kv_shared_layers={self.num_kv_shared_layers} is out of range")
        if self.use_bidirectional_attention not in (None, "vision"):
            raise InputError(f"text_config: use_bidirectional_attention={self.use_bidirectional_attention!r} is not "
                             "supported (only 'vision' and null)")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise InputError(f"text_config: unsupported hidden_activation '{self.hidden_activation}'")
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        for i in range(first_shared, self.num_hidden_layers):  # a "reuse" layer needs a producer of its type
            if self.layer_types[i] not in self.layer_types[:first_shared]:
                raise InputError(f"text_config: layer {i} shares K/V (num_kv_shared_layers="
                                 f"{self.num_kv_shared_layers}) but no earlier layer is {self.layer_types[i]}")
        for kind in set(self.layer_types):
            rope = self.rope_parameters.get(kind) if isinstance(self.rope_parameters, dict) else None
            if not rope or rope.get("rope_type", "default") not in ("default", "proportional"):
                raise InputError(f"text_config: rope_parameters[{kind!r}] = {rope!r} is not supported "
                                 "(rope_type 'default' or 'proportional')")
        for i in self.per_layer_config:
            if not 0 <= i < self.num_hidden_layers:
                raise InputError(f"text_config: per_layer_config names layer {i}, the model has "
                                 f"{self.num_hidden_layers} layers")

    def layer(self, i: int) -> LayerSpec:
        over = self.per_layer_config.get(i, {})
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        shared = i >= first_shared
        wide = shared and self.use_double_wide_mlp
        return LayerSpec(
            layer_type=self.layer_types[i],
            head_dim=int(over.get("head_dim", self.head_dim)),
            num_key_value_heads=int(over.get("num_key_value_heads", self.num_key_value_heads)),
            kv_shared=shared,
            intermediate_size=self.intermediate_size * (2 if wide else 1),
            k_eq_v=self.attention_k_eq_v and self.layer_types[i] == "full_attention",
        )


@dataclass(frozen=True)
class VisionConfig:
    patch_size: int
    pooling_kernel_size: int
    mm_embed_dim: int
    mm_posemb_size: int
    output_proj_dims: int
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict, where: str = "vision_config") -> VisionConfig:
        return cls(
            patch_size=_int(d, "patch_size", where),
            pooling_kernel_size=_int(d, "pooling_kernel_size", where),
            mm_embed_dim=_int(d, "mm_embed_dim", where),
            mm_posemb_size=_int(d, "mm_posemb_size", where),
            output_proj_dims=_int(d, "output_proj_dims", where),
            rms_norm_eps=_float(d, "rms_norm_eps", where, 1e-6),
        )

    def __post_init__(self):
        if self.output_proj_dims != self.mm_embed_dim:
            # The pre-projection RMSNorm has no weight, so a mismatch would only surface at the projection.
            raise InputError(f"vision_config: output_proj_dims={self.output_proj_dims} must equal "
                             f"mm_embed_dim={self.mm_embed_dim}")

    @property
    def model_patch_size(self) -> int:  # 16 px teacher patches merged 3x3 -> 48 px
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:
        return self.model_patch_size**2 * 3


@dataclass(frozen=True)
class AudioConfig:
    audio_embed_dim: int
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict, where: str = "audio_config") -> AudioConfig:
        dim = d.get("output_proj_dims", d.get("audio_embed_dim", d.get("hidden_size")))
        if dim is None:
            raise InputError(f"{where}: missing required key 'audio_embed_dim'")
        return cls(audio_embed_dim=int(dim), rms_norm_eps=_float(d, "rms_norm_eps", where, 1e-6))


@dataclass(frozen=True)
class ModelArgs:
    text: TextConfig
    vision: VisionConfig | None
    audio: AudioConfig | None
    image_token_id: int
    video_token_id: int
    audio_token_id: int
    boi_token_id: int
    eoi_token_id: int
    boa_token_id: int = 256000
    eoa_token_index: int = 258883
    tie_word_embeddings: bool = True
    dtype: str = "float32"
    quantization: dict | None = None  # MLX-style: {"group_size", "bits", "mode", <module path>: False | {...}}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> ModelArgs:
        mt = d.get("model_type")
        if mt != "gemma4_unified":
            raise InputError(f"{where}: model_type is {mt!r}, expected 'gemma4_unified'")
        text = TextConfig.from_dict(_require(d, "text_config", where), f"{where}: text_config")
        vision = d.get("vision_config")
        audio = d.get("audio_config")
        return cls(
            text=text,
            vision=VisionConfig.from_dict(vision, f"{where}: vision_config") if vision else None,
            audio=AudioConfig.from_dict(audio, f"{where}: audio_config") if audio else None,
            image_token_id=_int(d, "image_token_id", where, lo=0, hi=MAX_ID),
            video_token_id=_int(d, "video_token_id", where, 258884, lo=0, hi=MAX_ID),
            audio_token_id=_int(d, "audio_token_id", where, 258881, lo=0, hi=MAX_ID),
            boi_token_id=_int(d, "boi_token_id", where, lo=0, hi=MAX_ID),
            eoi_token_id=_int(d, "eoi_token_id", where, lo=0, hi=MAX_ID),
            boa_token_id=_int(d, "boa_token_id", where, 256000, lo=0, hi=MAX_ID),
            eoa_token_index=_int(d, "eoa_token_index", where, 258883, lo=0, hi=MAX_ID),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", where, True),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
            quantization=d.get("quantization"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        return read_config(path, cls.from_dict)


def read_config(path: str | Path, build: Callable[[dict, str], T]) -> T:
    """``build(config dict, where)`` of a ``config.json``; an unreadable file or a malformed value is an
    ``InputError`` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        d = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(d, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    try:
        return build(d, str(path))
    except InputError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise InputError(f"{path}: malformed value ({type(e).__name__}: {e})") from None
