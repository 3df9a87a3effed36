"""Gemma 4 unified's configuration (model_type `gemma4_unified`): the vision and audio embedders' sections
and the whole model's, around the shared decoder's TextConfig (rmlx.nn.config).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rmlx.errors import InputError
from rmlx.nn.config import (
    MAX_DIM,
    MAX_ID,
    TextConfig,
    _bool,
    _float,
    _int,
    _section,
    _short,
    _str,
    read_config,
)

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)


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
        if self.patch_dim > MAX_DIM:  # one flattened patch is a row of patch_dense's input
            raise InputError(f"vision_config: patch_size={self.patch_size} x pooling_kernel_size="
                             f"{self.pooling_kernel_size} makes a {self.patch_dim}-value patch, more than {MAX_DIM}")
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
        key = next((k for k in ("output_proj_dims", "audio_embed_dim", "hidden_size") if d.get(k) is not None), None)
        if key is None:
            raise InputError(f"{where}: missing required key 'audio_embed_dim'")
        dim = _int(d, key, where)
        return cls(audio_embed_dim=dim, rms_norm_eps=_float(d, "rms_norm_eps", where, 1e-6))


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
        text = TextConfig.from_dict(_section(d, "text_config", where, required=True), f"{where}: text_config")
        vision = _section(d, "vision_config", where)
        audio = _section(d, "audio_config", where)
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
            dtype=_str(d, "dtype", where, None) or _str(d, "torch_dtype", where, None) or "float32",
            quantization=_quantization(d, where),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        return read_config(path, cls.from_dict)


def _quantization(d: dict, where: str) -> dict | None:
    """MLX's ``quantization`` section: {"group_size": int, "bits": int, "mode": str, <module path>: false
    or {"group_size", "bits", "mode"}} (the values themselves are checked against the mode on load)."""
    q = _section(d, "quantization", where)
    if q is None:
        return None
    at = f"{where}: quantization"
    _int(q, "group_size", at, None)
    _int(q, "bits", at, None)
    _str(q, "mode", at, None)
    for key, v in q.items():
        if key in ("group_size", "bits", "mode"):
            continue
        if isinstance(v, dict):
            _int(v, "group_size", f"{at}[{_short(key)}]", None)
            _int(v, "bits", f"{at}[{_short(key)}]", None)
            _str(v, "mode", f"{at}[{_short(key)}]", None)
        elif not isinstance(v, bool):
            raise InputError(f"{at}: {_short(key)} must be false (left unquantized) or an object, got {_short(v)}")
    return q
