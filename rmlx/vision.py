"""Encoder-free vision embedder (catalog §2): no attention, one soft token per 48x48 patch.

    pixels -> LN1 -> Dense -> LN2 -> + posemb_x[x] + posemb_y[y] -> LN3 (pos_norm)
           -> RMSNorm (no weight) -> Linear (no bias) -> drop padding rows
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from rmlx import faults
from rmlx.base import LayerNorm, layer_norm, rms_norm
from rmlx.config import VisionConfig
from rmlx.errors import InputError
from rmlx.tap import tap

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default; all three vision LayerNorms use it


class VisionEmbedder(nn.Module):
    """Attribute names are the on-disk names under ``model.vision_embedder`` (catalog §7.2)."""

    def __init__(self, cfg: VisionConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.patch_ln1 = LayerNorm(cfg.patch_dim, eps=LAYER_NORM_EPS)
        self.patch_dense = nn.Linear(cfg.patch_dim, cfg.mm_embed_dim, bias=True)
        self.patch_ln2 = LayerNorm(cfg.mm_embed_dim, eps=LAYER_NORM_EPS)
        self.pos_embedding = mx.zeros((cfg.mm_posemb_size, 2, cfg.mm_embed_dim))
        self.pos_norm = LayerNorm(cfg.mm_embed_dim, eps=LAYER_NORM_EPS)
        self.embedding_projection = nn.Linear(cfg.output_proj_dims, hidden_size, bias=False)

    def position_embedding(self, position_ids: mx.array) -> mx.array:
        """(B, P, 2) int (x, y), -1 = padding -> (B, P, mm): table[x, 0] * valid_x + table[y, 1] * valid_y."""
        cx = mx.maximum(position_ids[..., 0], 0)
        cy = mx.maximum(position_ids[..., 1], 0)
        valid = (position_ids != -1).astype(self.pos_embedding.dtype)[..., None]  # (B, P, 2, 1)
        if faults.active("posemb-xy-swap"):
            cx, cy = cy, cx
        ex = mx.take(self.pos_embedding[:, 0, :], cx, axis=0)  # (B, P, mm)
        ey = mx.take(self.pos_embedding[:, 1, :], cy, axis=0)
        return ex * valid[..., 0, :] + ey * valid[..., 1, :]

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        """pixel_values (B, P, 6912), position_ids (B, P, 2) -> soft tokens (1, N_valid, H).

        Valid rows of every image, in order, concatenated (what HF scatters into the image slots).
        """
        pos_np = np.asarray(position_ids)
        if pos_np.max(initial=-1) >= self.cfg.mm_posemb_size:
            raise InputError(f"position id {int(pos_np.max())} is outside the position table "
                             f"(mm_posemb_size={self.cfg.mm_posemb_size})")
        x = pixel_values.astype(self.patch_ln1.weight.dtype)  # bf16 models see bf16 pixels (catalog §2 step 0)
        ln1 = self.patch_ln1
        eps1 = 1e-6 if faults.active("patch-ln1-eps") else ln1.eps
        h = tap("vision.patch_ln1", layer_norm(x, ln1.weight, ln1.bias, eps1))
        h = tap("vision.patch_dense", self.patch_dense(h))
        h = tap("vision.patch_ln2", self.patch_ln2(h))
        h = tap("vision.pos_embed", h + self.position_embedding(position_ids))
        h = tap("vision.pos_norm", self.pos_norm(h))
        h = h.astype(self.embedding_projection.weight.dtype)
        h = tap("vision.mm_prenorm", rms_norm(h, None, self.cfg.rms_norm_eps))
        h = self.embedding_projection(h)  # (B, P, H)
        keep = np.flatnonzero((pos_np != -1).all(-1).reshape(-1))  # valid rows of the flattened batch
        soft = h.reshape(-1, h.shape[-1])[mx.array(keep)][None]  # (B*P, H) -> (1, N_valid, H)
        return tap("vision.soft_tokens", soft)
