"""The Gemma 4 unified model: text decoder, encoder-free vision embedder, audio projection.

``sanitize`` maps both checkpoint spellings (on-disk and HF in-memory, catalog §7.2) onto the
attribute paths of this module tree; an unrecognised key is an error that names it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from rmlx.errors import InputError
from rmlx.models.gemma4_unified.config import AudioConfig, ModelArgs
from rmlx.models.gemma4_unified.vision import VisionEmbedder
from rmlx.nn.base import attention_masks, rms_norm
from rmlx.nn.kernels import Linear
from rmlx.nn.quant import dequantized_weights
from rmlx.nn.text import KVCache, TextModel
from rmlx.tap import active as tap_active
from rmlx.tap import tap


class AudioEmbedder(nn.Module):
    """Raw 640-sample audio frames -> RMSNorm (no weight) -> Linear (no bias): one soft token per frame."""

    def __init__(self, cfg: AudioConfig, hidden_size: int):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.embedding_projection = Linear(cfg.audio_embed_dim, hidden_size, bias=False)

    def __call__(self, frames: mx.array) -> mx.array:
        """(1, N, 640) -> (1, N, H)."""
        x = frames.astype(self.embedding_projection.weight.dtype)
        return self.embedding_projection(rms_norm(x, None, self.eps))


# (checkpoint prefix, module path), most specific first. Both the on-disk spelling written by
# save_pretrained and the in-memory state_dict spelling load.
_PREFIXES = (
    ("model.embed_vision.multimodal_embedder.embedding_projection.", "vision_embedder.embedding_projection."),
    ("model.embed_vision.embedding_projection.", "vision_embedder.embedding_projection."),
    ("model.embed_vision.", "vision_embedder."),
    ("model.vision_embedder.", "vision_embedder."),
    ("model.embed_audio.embedding_projection.", "embed_audio.embedding_projection."),
    ("model.language_model.", "language_model."),
)


def module_path(checkpoint_name: str) -> str:
    """A checkpoint key or module path (either HF spelling) -> the module path in this tree."""
    name = checkpoint_name + "."
    for prefix, target in _PREFIXES:
        if name.startswith(prefix):
            return (target + name[len(prefix):])[:-1]
    raise InputError(f"'{checkpoint_name}' is not a module of a gemma4_unified checkpoint")


def checkpoint_key(name: str) -> str:
    """A module path in the spelling ``save_pretrained`` writes (for error messages)."""
    for prefix, target in (("model.embed_vision.embedding_projection.", "vision_embedder.embedding_projection."),
                           ("model.vision_embedder.", "vision_embedder."),
                           ("model.embed_audio.embedding_projection.", "embed_audio.embedding_projection."),
                           ("model.language_model.", "language_model.")):
        if name.startswith(target):
            return prefix + name[len(target):]
    return name


def scatter(h: mx.array, slots: np.ndarray, soft: mx.array | None, what: str) -> mx.array:
    """HF's ``masked_scatter``: soft tokens (1, N, H) into the ``what`` slots of h (1, L, H), in sequence
    order; a count mismatch is an error, never a silent wrap-around."""
    n_slots = int(slots.sum())
    n_soft = 0 if soft is None else soft.shape[1]
    if n_slots != n_soft:
        raise InputError(f"{what} soft tokens and {what} token slots do not match: "
                         f"{n_soft} soft tokens, {n_slots} slots")
    if n_slots == 0:
        return h
    h[:, mx.array(np.flatnonzero(slots[0]))] = soft.astype(h.dtype)  # (1, N, H) into the slots, in order
    return h


def decoder_masks(types: np.ndarray, cfg, policy: str, offset: int, length: int, cached: bool
                  ) -> dict[str, mx.array] | None:
    """The decoder's masks by layer type, tapped: built on the prefill (``offset`` 0) from the token types
    (the image blocks overlay when ``use_bidirectional_attention`` is "vision"); None on a decode step,
    where a text token after the prompt sees every cached key (the rotating cache holds the window)."""
    if offset == 0:
        overlay = types if cfg.use_bidirectional_attention == "vision" else np.zeros_like(types)
        masks = attention_masks(mx.array(overlay), cfg.sliding_window, policy)
        return {"full_attention": tap("mask.full_attention", masks["full_attention"]),
                "sliding_attention": tap("mask.sliding_attention", masks["sliding_attention"])}
    if length == 1 and cached:
        return None
    raise InputError("a decode step takes exactly one token and a cache")


def rename_keys(weights: dict[str, mx.array], prefixes: tuple[tuple[str, str], ...], tied: bool, family: str
                ) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Checkpoint keys -> module paths by ``prefixes`` ((checkpoint prefix, module path), most specific
    first). Returns the renamed weights and {module path: checkpoint key}. A tied ``lm_head.weight`` is
    dropped (the token embedding serves), an untied one is the language model's ``lm_head``; an unknown
    key, or one given twice, is an error naming it."""
    out: dict[str, mx.array] = {}
    source: dict[str, str] = {}
    for key, value in weights.items():
        if key == "lm_head.weight":  # tied: the token embedding serves; untied: the language model's lm_head
            if not tied:
                out["language_model.lm_head.weight"], source["language_model.lm_head.weight"] = value, key
            continue
        for prefix, target in prefixes:
            if key.startswith(prefix):
                name = target + key[len(prefix):]
                break
        else:
            raise InputError(f"unexpected tensor '{key}': not part of a {family} checkpoint")
        if name in out:
            raise InputError(f"tensor given twice under two spellings: '{source[name]}' and '{key}'")
        out[name], source[name] = value, key
    return out, source


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.language_model = TextModel(args.text, args.tie_word_embeddings)
        if args.vision is not None:
            self.vision_embedder = VisionEmbedder(args.vision, args.text.hidden_size)
        if args.audio is not None:
            self.embed_audio = AudioEmbedder(args.audio, args.text.hidden_size)

    def token_types(self, input_ids: np.ndarray) -> np.ndarray:
        """HF's mm_token_type_ids: 1 image token, 2 video token, 3 audio token, 0 otherwise (boi/eoi are text)."""
        a = self.args
        return np.select([input_ids == a.image_token_id, input_ids == a.video_token_id,
                          input_ids == a.audio_token_id], [1, 2, 3], 0).astype(np.int64)

    def __call__(self, input_ids: np.ndarray, mm_token_type_ids: np.ndarray | None = None,
                 pixel_values: np.ndarray | None = None, image_position_ids: np.ndarray | None = None,
                 audio_frames: np.ndarray | None = None, mask_policy: str = "official",
                 cache: list[KVCache | None] | None = None, offset: int = 0) -> mx.array:
        """Prefill (offset 0) or one decode step (offset > 0, one token, with ``cache``) -> logits (1, L, V)."""
        h, masks = self.embed_inputs(input_ids, mm_token_type_ids, pixel_values, image_position_ids, audio_frames,
                                     mask_policy, cache, offset)
        return self.language_model(h, masks, cache, offset)

    def embed_inputs(self, input_ids: np.ndarray, mm_token_type_ids: np.ndarray | None = None,
                     pixel_values: np.ndarray | None = None, image_position_ids: np.ndarray | None = None,
                     audio_frames: np.ndarray | None = None, mask_policy: str = "official",
                     cache: list[KVCache | None] | None = None, offset: int = 0
                     ) -> tuple[mx.array, dict[str, mx.array] | None]:
        """Everything before the first decoder layer: (inputs_embeds (1, L, H), masks by layer type;
        None on a decode step). ``__call__`` and the layer-streaming driver share it.

        Soft tokens are scattered into the image / audio slots in sequence order; a count mismatch is
        an error, never a silent wrap-around.
        """
        a = self.args
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise InputError(f"input_ids must have shape (1, L), got {ids.shape}")
        types = self.token_types(ids) if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
        if offset == 0 and (types == 2).any():  # a decode step embeds a generated video id as pad, as HF does
            raise InputError("video tokens are not supported by rmlx yet")
        text_ids = np.where(types > 0, a.text.pad_token_id, ids)  # soft-token slots embed the pad token
        h = tap("text.embed_tokens", self.language_model.embed(mx.array(text_ids)))
        if offset == 0 and tap_active():  # record-only: the kernels keep using the packed weights
            for name, weight in dequantized_weights(self).items():
                tap(name, weight)
        if offset == 0:  # decode steps embed a generated soft-token id as the pad token, as HF does
            h = self._scatter(h, types == 1, self._image_tokens(pixel_values, image_position_ids), "image")
            audio = None if audio_frames is None else tap("audio.soft_tokens",
                                                          self.embed_audio(mx.array(audio_frames)))
            h = self._scatter(h, types == 3, audio, "audio")
        h = tap("text.inputs_embeds", h)
        return h, decoder_masks(types, a.text, mask_policy, offset, ids.shape[1], cache is not None)

    def _image_tokens(self, pixel_values, image_position_ids) -> mx.array | None:
        if pixel_values is None:
            return None
        if "vision_embedder" not in self:
            raise InputError("the checkpoint has no vision_config, but the case has an image")
        return self.vision_embedder(mx.array(pixel_values), mx.array(image_position_ids))

    _scatter = staticmethod(scatter)  # one seam for the soft tokens of every kind

    def make_cache(self) -> list[KVCache | None]:
        return self.language_model.make_cache()

    def sanitize(self, weights: dict[str, mx.array]) -> tuple[dict[str, mx.array], dict[str, str]]:
        """Checkpoint keys -> module paths. Returns the renamed weights and {module path: checkpoint key}."""
        return rename_keys(weights, _PREFIXES, self.args.tie_word_embeddings, "gemma4_unified")

