"""Tiny ``Gemma4ForConditionalGeneration`` checkpoints (text + vision, no audio), made by transformers'
own config and model classes and written by ``save_pretrained``.

transformers 5.24 does not ship its ``tests/models/gemma4`` in site-packages, so the sizes are picked
here: hidden 32, 4 text layers (sliding, full, sliding, full: both head sizes and RoPE kinds), a
sliding window of 8 (shorter than an image block, so the window cuts the bidirectional overlay),
vocab 256, no PLE / MoE; a 2-layer vision tower with GQA (4 heads, 2 KV heads), 4-px patches pooled
3x3 (48-value patch rows, so small images work), a 64-entry position table, clipped linears and
standardisation on. Every tensor is re-drawn from one seeded generator so that no convention passes
by accident: norm weights 1 + 0.1 N (q/k norms also * d^-1/4, keeping attention soft), position
table 0.5 N, ``layer_scalar`` 0.8..1.2, std_bias 0.5 N, std_scale 1 + 0.2 N, clip bounds finite and
biting (inputs +-[1.5, 2.5), outputs +-[1.0, 2.0)), linears and the token embedding N(0, 1/fan_in).
Same arguments, same bytes (config.json, model.safetensors, generation_config.json,
preprocessor_config.json); the model file is ~0.33 MB.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

TOKEN_IDS = dict(image_token_id=250, boi_token_id=251, eoi_token_id=252, video_token_id=253, audio_token_id=254,
                 boa_token_id=255, eoa_token_index=249)
TEXT = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, global_head_dim=32,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            sliding_window=8, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
            use_bidirectional_attention="vision", enable_moe_block=False,
            pad_token_id=0, bos_token_id=2, eos_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, patch_size=4, pooling_kernel_size=3, position_embedding_size=64,
              use_clipped_linears=True, standardize=True)
MAX_SOFT_TOKENS = 70  # the smallest budget HF's processor accepts: 630 patch rows per image

_NORMS = ("layernorm.weight", "q_norm.weight", "k_norm.weight", "norm.weight")


def tiny_config(**overrides):
    """The tiny ``Gemma4Config``. ``overrides``: ``text=`` / ``vision=`` dicts update those sub-configs
    (``vision=None`` drops the tower); any other key goes to ``Gemma4Config``."""
    from transformers import Gemma4Config

    text = {**copy.deepcopy(TEXT), **overrides.pop("text", {})}
    vision = overrides.pop("vision", {})
    vision = None if vision is None else {**copy.deepcopy(VISION), **vision}
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None, **{**TOKEN_IDS, **overrides})


def rerandomise(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every stored tensor (sorted by name, one generator) with the conventions above."""
    rng = np.random.default_rng(seed)
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            if name == "lm_head.weight":
                continue  # tied to the token embedding
            t = state[name]
            shape = tuple(t.shape)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "layer_scalar":
                layer = int(name.split(".layers.")[1].split(".")[0])
                value = np.full(shape, (0.8, 0.9, 1.1, 1.2)[layer % 4])
            elif name.endswith(_NORMS):
                value = 1.0 + 0.1 * rng.standard_normal(shape)
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    value *= shape[-1] ** -0.25
            elif leaf == "position_embedding_table":
                value = 0.5 * rng.standard_normal(shape)
            elif leaf == "std_bias":
                value = 0.5 * rng.standard_normal(shape)
            elif leaf == "std_scale":
                value = 1.0 + 0.2 * rng.standard_normal(shape)
            elif leaf in ("input_min", "input_max"):
                value = (1.0 if leaf == "input_max" else -1.0) * (1.5 + rng.random(shape))
            elif leaf in ("output_min", "output_max"):
                value = (1.0 if leaf == "output_max" else -1.0) * (1.0 + rng.random(shape))
            else:  # linears and the token embedding
                value = rng.standard_normal(shape) / np.sqrt(shape[-1])
            t.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def build_model(seed: int = 0, **overrides):
    from transformers import Gemma4ForConditionalGeneration

    config = tiny_config(**overrides)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).eval()
    rerandomise(model, seed)
    return model


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Write the tiny checkpoint (and its image processor config) into ``out_dir``; returns the path."""
    from transformers import Gemma4ImageProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    model = build_model(seed, **overrides)
    model.save_pretrained(out, safe_serialization=True)
    vision = model.config.vision_config
    if vision is not None:
        Gemma4ImageProcessor(patch_size=vision.patch_size, pooling_kernel_size=vision.pooling_kernel_size,
                             max_soft_tokens=MAX_SOFT_TOKENS).save_pretrained(out)
    return out
