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
        n = int(_require(d, "num_hidden_layers", where))
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
        k_eq_v = bool(d.get("attention_k_eq_v", False))
        if "per_layer_config" in d:
            # Present (even as {} or null): used as is; HF drops entries equal to the base values.
            per_layer = {int(k): dict(v) for k, v in (d["per_layer_config"] or {}).items()}
        else:
            overrides = {"head_dim": int(d.get("global_head_dim", 512))}
            if k_eq_v and d.get("num_global_key_value_heads") is not None:
                overrides["num_key_value_heads"] = int(d["num_global_key_value_heads"])
            per_layer = {i: dict(overrides) for i, t in enumerate(layer_types) if t == "full_attention"}
        rope = d.get("rope_parameters") or dict(_DEFAULT_ROPE)
        return cls(
            vocab_size=int(_require(d, "vocab_size", where)),
            hidden_size=int(_require(d, "hidden_size", where)),
            intermediate_size=int(_require(d, "intermediate_size", where)),
            num_hidden_layers=n,
            num_attention_heads=int(_require(d, "num_attention_heads", where)),
            num_key_value_heads=int(_require(d, "num_key_value_heads", where)),
            head_dim=int(_require(d, "head_dim", where)),
            layer_types=tuple(layer_types),
            per_layer_config=per_layer,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            sliding_window=int(d.get("sliding_window", 1024)),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            rope_parameters=rope,
            attention_k_eq_v=k_eq_v,
            num_kv_shared_layers=int(d.get("num_kv_shared_layers", 0)),
            use_double_wide_mlp=bool(d.get("use_double_wide_mlp", False)),
            use_bidirectional_attention=d.get("use_bidirectional_attention", "vision"),
            hidden_activation=d.get("hidden_activation", "gelu_pytorch_tanh"),
            pad_token_id=int(d.get("pad_token_id", 0) or 0),
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
            patch_size=int(_require(d, "patch_size", where)),
            pooling_kernel_size=int(_require(d, "pooling_kernel_size", where)),
            mm_embed_dim=int(_require(d, "mm_embed_dim", where)),
            mm_posemb_size=int(_require(d, "mm_posemb_size", where)),
            output_proj_dims=int(_require(d, "output_proj_dims", where)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
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
        return cls(audio_embed_dim=int(dim), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)))


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
            image_token_id=int(_require(d, "image_token_id", where)),
            video_token_id=int(d.get("video_token_id", 258884)),
            audio_token_id=int(d.get("audio_token_id", 258881)),
            boi_token_id=int(_require(d, "boi_token_id", where)),
            eoi_token_id=int(_require(d, "eoi_token_id", where)),
            boa_token_id=int(d.get("boa_token_id", 256000)),
            eoa_token_index=int(d.get("eoa_token_index", 258883)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
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
    if not isinstance(d, dict):
        raise InputError(f"{path}: expected a JSON object at the top level")
    try:
        return build(d, str(path))
    except InputError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise InputError(f"{path}: malformed value ({type(e).__name__}: {e})") from None
