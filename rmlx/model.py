"""The Gemma 4 unified model: text decoder, encoder-free vision embedder, audio projection.

``sanitize`` maps both checkpoint spellings (on-disk and HF in-memory, catalog §7.2) onto the
attribute paths of this module tree; an unrecognised key is an error that names it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from rmlx.config import AudioConfig, ModelArgs
from rmlx.errors import InputError
from rmlx.text import TextModel
from rmlx.vision import VisionEmbedder


class AudioEmbedder(nn.Module):
    def __init__(self, cfg: AudioConfig, hidden_size: int):
        super().__init__()
        self.embedding_projection = nn.Linear(cfg.audio_embed_dim, hidden_size, bias=False)


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


def checkpoint_key(name: str) -> str:
    """A module path in the spelling ``save_pretrained`` writes (for error messages)."""
    for prefix, target in (("model.embed_vision.embedding_projection.", "vision_embedder.embedding_projection."),
                           ("model.vision_embedder.", "vision_embedder."),
                           ("model.embed_audio.embedding_projection.", "embed_audio.embedding_projection."),
                           ("model.language_model.", "language_model.")):
        if name.startswith(target):
            return prefix + name[len(target):]
    return name


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.language_model = TextModel(args.text)
        if args.vision is not None:
            self.vision_embedder = VisionEmbedder(args.vision, args.text.hidden_size)
        if args.audio is not None:
            self.embed_audio = AudioEmbedder(args.audio, args.text.hidden_size)

    def sanitize(self, weights: dict[str, mx.array]) -> tuple[dict[str, mx.array], dict[str, str]]:
        """Checkpoint keys -> module paths. Returns the renamed weights and {module path: checkpoint key}."""
        out: dict[str, mx.array] = {}
        source: dict[str, str] = {}
        for key, value in weights.items():
            if key == "lm_head.weight":
                if not self.args.tie_word_embeddings:
                    raise InputError("lm_head.weight: untied output embeddings are not supported "
                                     "(config tie_word_embeddings is false)")
                continue  # tied: the token embedding serves as the output projection
            for prefix, target in _PREFIXES:
                if key.startswith(prefix):
                    name = target + key[len(prefix):]
                    break
            else:
                raise InputError(f"unexpected tensor '{key}': not part of a gemma4_unified checkpoint")
            if name in out:
                raise InputError(f"tensor given twice under two spellings: '{source[name]}' and '{key}'")
            out[name], source[name] = value, key
        return out, source
