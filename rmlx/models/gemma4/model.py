"""Gemma 4 (``model_type: "gemma4"``, HF ``Gemma4ForConditionalGeneration``): SigLIP-style vision tower,
multimodal embedder, and the unified text decoder ``rmlx.nn.text.TextModel`` (reused, not copied).

Checkpoint keys -> module paths: ``model.vision_tower.*`` -> ``vision_tower.*``, ``model.embed_vision.*``
-> ``embed_vision.*``, ``model.language_model.*`` -> ``language_model.*``; ``lm_head.weight`` is the tied
token embedding. Anything else is an error naming the key.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from rmlx.errors import InputError
from rmlx.load import load_checkpoint
from rmlx.models.gemma4.config import ModelArgs
from rmlx.models.gemma4.vision import VisionModel
from rmlx.models.gemma4_unified.model import decoder_masks, rename_keys, scatter
from rmlx.nn.base import rms_norm
from rmlx.nn.kernels import Linear
from rmlx.nn.text import KVCache, TextModel
from rmlx.tap import tap

_PREFIXES = (  # (checkpoint prefix, module path)
    ("model.vision_tower.", "vision_tower."),
    ("model.embed_vision.", "embed_vision."),
    ("model.language_model.", "language_model."),
)


class MultimodalEmbedder(nn.Module):
    """HF ``Gemma4MultimodalEmbedder``: RMSNorm without a weight (eps of the vision config), then a
    bias-free Linear into the text width."""

    def __init__(self, in_dims: int, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = Linear(in_dims, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(rms_norm(x, None, self.eps))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.language_model = TextModel(args.text, args.tie_word_embeddings)
        if args.vision is not None:
            self.vision_tower = VisionModel(args.vision)
            self.embed_vision = MultimodalEmbedder(args.vision.hidden_size, args.text.hidden_size,
                                                   args.vision.rms_norm_eps)

    def token_types(self, input_ids: np.ndarray) -> np.ndarray:
        """The processor's mm_token_type_ids: 1 image token, 2 video, 3 audio, 0 otherwise (boi/eoi are text)."""
        a = self.args
        return np.select([input_ids == a.image_token_id, input_ids == a.video_token_id,
                          input_ids == a.audio_token_id], [1, 2, 3], 0).astype(np.int64)

    def image_features(self, pixel_values: np.ndarray, image_position_ids: np.ndarray) -> mx.array:
        """HF ``get_image_features``, the per-image pieces concatenated: soft tokens (1, N, text hidden)."""
        if "vision_tower" not in self:
            raise InputError("the checkpoint has no vision_config, but the case has an image")
        return tap("vision.soft_tokens", self.embed_vision(self.vision_tower(pixel_values, image_position_ids)))

    def __call__(self, input_ids: np.ndarray, mm_token_type_ids: np.ndarray | None = None,
                 pixel_values: np.ndarray | None = None, image_position_ids: np.ndarray | None = None,
                 cache: list[KVCache | None] | None = None, offset: int = 0, policy: str = "official") -> mx.array:
        """Prefill (offset 0) or one decode step (offset > 0, one token, with ``cache``) -> logits (1, L, V).
        ``policy``: the attention-mask policy of the prefill (``rmlx.nn.base.attention_masks``; HF's gemma4
        forward builds ``official``)."""
        h, masks = self.embed_inputs(input_ids, mm_token_type_ids, pixel_values, image_position_ids, cache, offset,
                                     policy)
        return self.language_model(h, masks, cache, offset)

    def embed_inputs(self, input_ids: np.ndarray, mm_token_type_ids: np.ndarray | None = None,
                     pixel_values: np.ndarray | None = None, image_position_ids: np.ndarray | None = None,
                     cache: list[KVCache | None] | None = None, offset: int = 0, policy: str = "official"
                     ) -> tuple[mx.array, dict[str, mx.array] | None]:
        """(inputs_embeds (1, L, H), masks by layer type; None on a decode step).

        As ``Gemma4Model.forward``: image/video/audio slots embed the pad token; the image soft tokens
        go into the ``image_token_id`` slots in order (a count mismatch is an error); masks follow
        ``create_masks_for_vision_model`` (full: causal; sliding: (causal | same image block) & window)
        when ``use_bidirectional_attention`` is "vision", else causal and causal & window.
        ``mm_token_type_ids`` None: derived from the ids, as the processor does. (HF given None builds
        plain causal masks; pass the processor's ids to both.)
        """
        a = self.args
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise InputError(f"input_ids must have shape (1, L), got {ids.shape}")
        types = self.token_types(ids) if mm_token_type_ids is None else np.asarray(mm_token_type_ids, np.int64)
        if types.shape != ids.shape:
            raise InputError(f"mm_token_type_ids has shape {types.shape}, input_ids {ids.shape}")
        if offset == 0:  # a decode step embeds a generated video or audio id as the pad token, as HF does
            if (ids == a.video_token_id).any() or (types == 2).any():
                raise InputError("video tokens are not supported by rmlx yet")
            if (ids == a.audio_token_id).any():
                raise InputError("audio tokens are not supported: the gemma4 audio tower is not ported")
        multimodal = (ids == a.image_token_id) | (ids == a.video_token_id) | (ids == a.audio_token_id)
        text_ids = np.where(multimodal, a.text.pad_token_id, ids)
        h = tap("text.embed_tokens", self.language_model.embed(mx.array(text_ids)))
        slots = ids == a.image_token_id
        if offset == 0:  # a decode step embeds a generated soft-token id as the pad token, as HF does
            soft = None if pixel_values is None else self.image_features(pixel_values, image_position_ids)
            h = scatter(h, slots, soft, "image")
        h = tap("text.inputs_embeds", h)
        return h, decoder_masks(types, a.text, policy, offset, ids.shape[1], cache is not None)

    def make_cache(self) -> list[KVCache | None]:
        return self.language_model.make_cache()

    def sanitize(self, weights: dict[str, mx.array]) -> tuple[dict[str, mx.array], dict[str, str]]:
        """Checkpoint keys -> module paths. Returns the renamed weights and {module path: checkpoint key}."""
        return rename_keys(weights, _PREFIXES, self.args.tie_word_embeddings, "gemma4 (text + vision)")


def checkpoint_key(name: str) -> str:
    """A module path -> the checkpoint key (for error messages)."""
    for prefix, target in _PREFIXES:
        if name.startswith(target):
            return prefix + name[len(target):]
    return name


def load_model(model_dir: str | Path, dtype: str = "float32") -> Model:
    """Load a gemma4 checkpoint directory (config.json + safetensors, one file or shards) into a ``Model``
    in ``dtype``. Strict (``rmlx.load.load_checkpoint``): a missing, unexpected or mis-shaped tensor is an
    ``InputError`` naming the key.
    """

    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(f"{path}: checkpoint directory not found")
    model = Model(ModelArgs.from_file(path / "config.json"))
    load_checkpoint(model, path, dtype, checkpoint_key)
    mx.eval(model.parameters())
    return model
