"""Encoder-free vision embedder (catalog §2): no attention, one soft token per 48x48 patch.

    pixels -> LN1 -> Dense -> LN2 -> + posemb_x[x] + posemb_y[y] -> LN3 (pos_norm)
           -> RMSNorm (no weight) -> Linear (no bias) -> drop padding rows
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from rmlx.errors import InputError
from rmlx.models.gemma4_unified.config import VisionConfig
from rmlx.nn.base import (
    LayerNorm,
    join_rows,
    layer_norm_rows,
    on_streams,
    rms_norm_rows,
    split_like,
    split_rows,
)
from rmlx.nn.kernels import Linear
from rmlx.tap import active as tap_active
from rmlx.tap import tap

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default; all three vision LayerNorms use it


class VisionEmbedder(nn.Module):
    """Attribute names are the on-disk names under ``model.vision_embedder`` (catalog §7.2)."""

    def __init__(self, cfg: VisionConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.patch_ln1 = LayerNorm(cfg.patch_dim, eps=LAYER_NORM_EPS)
        self.patch_dense = Linear(cfg.patch_dim, cfg.mm_embed_dim, bias=True)
        self.patch_ln2 = LayerNorm(cfg.mm_embed_dim, eps=LAYER_NORM_EPS)
        self.pos_embedding = mx.zeros((cfg.mm_posemb_size, 2, cfg.mm_embed_dim))
        self.pos_norm = LayerNorm(cfg.mm_embed_dim, eps=LAYER_NORM_EPS)
        self.embedding_projection = Linear(cfg.output_proj_dims, hidden_size, bias=False)

    def position_embedding(self, position_ids: mx.array) -> mx.array:
        """(B, P, 2) int (x, y), -1 = padding -> (B, P, mm): table[x, 0] * valid_x + table[y, 1] * valid_y."""
        cx = mx.maximum(position_ids[..., 0], 0)
        cy = mx.maximum(position_ids[..., 1], 0)
        valid = (position_ids != -1).astype(self.pos_embedding.dtype)[..., None]  # (B, P, 2, 1)
        ex = mx.take(self.pos_embedding[:, 0, :], cx, axis=0)  # (B, P, mm)
        ey = mx.take(self.pos_embedding[:, 1, :], cy, axis=0)
        return ex * valid[..., 0, :] + ey * valid[..., 1, :]

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        """pixel_values (B, P, 6912), position_ids (B, P, 2) -> soft tokens (1, N_valid, H).

        Valid rows of every image, in order, concatenated (what HF scatters into the image slots).
        Every step is row-wise: at real size the norms and the position embedding run on two halves of
        the rows at once, on two CPU streams (:func:`rmlx.nn.base.split_rows`), and the halves are joined
        only where a matmul needs the whole (measured: a matmul on each half in turn is 5-10 % slower).
        """
        pos_np = np.asarray(position_ids)
        if pos_np.max(initial=-1) >= self.cfg.mm_posemb_size:
            raise InputError(f"position id {int(pos_np.max())} is outside the position table "
                             f"(mm_posemb_size={self.cfg.mm_posemb_size})")
        x = pixel_values.astype(self.patch_ln1.weight.dtype)  # bf16 models see bf16 pixels (catalog §2 step 0)
        h = tap("vision.patch_ln1", self.patch_ln1(x))
        h = tap("vision.patch_dense", self.patch_dense(h))
        h = _tap("vision.patch_ln2", on_streams(_rows(self.patch_ln2), split_rows(h)))
        h = _tap("vision.pos_embed", on_streams(lambda r, p: r + self.position_embedding(p), h,
                                                split_like(position_ids, h)))
        h = _tap("vision.pos_norm", on_streams(_rows(self.pos_norm), h))
        dtype, eps = self.embedding_projection.weight.dtype, self.cfg.rms_norm_eps
        h = join_rows(on_streams(lambda r: rms_norm_rows(r.astype(dtype), None, eps), h))
        h = self.embedding_projection(tap("vision.mm_prenorm", h))  # (B, P, H)
        keep = np.flatnonzero((pos_np != -1).all(-1).reshape(-1))  # valid rows of the flattened batch
        flat = h.reshape(-1, h.shape[-1])  # (B*P, H)
        if keep.size == 0 or keep[-1] == keep.size - 1:
            soft = flat[: keep.size][None]  # the valid rows lead (one image, padding last): a view, no copy
        else:
            soft = flat[mx.array(keep)][None]  # (1, N_valid, H)
        return tap("vision.soft_tokens", soft)


def _rows(norm: LayerNorm):
    """``norm`` as a function of one row part (for :func:`on_streams`)."""
    return lambda r: layer_norm_rows(r, norm.weight, norm.bias, norm.eps)


def _tap(name: str, rows: list[mx.array]) -> list[mx.array]:
    """:func:`tap` a stage held as row halves: the handler sees (and may replace) the joined array
    (one copy more, only while a handler is installed)."""
    if not tap_active():
        return rows
    return split_like(tap(name, join_rows(rows)), rows)
