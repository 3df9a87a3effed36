"""What every family's HF reference runner shares: the run dtypes, HF's eager attention in float64 (registered
as ``eager_float64``), a tensor to NumPy, a mask to its boolean view, and a forward's keyword arguments."""

from __future__ import annotations

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "eager_float64")
FLOAT64_ATTENTION = "eager_float64"


def eager_float64(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """transformers' eager attention with the softmax in the activations' dtype: its own eager upcasts
    the softmax to float32 only, which in a float64 model would leave fp32 rounding in the float64
    reference (``Gemma4UnifiedTextAttention`` and the SigLIP tower both dispatch through this name)."""
    groups = getattr(module, "num_key_value_groups", 1)
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    weights = torch.matmul(query, k.transpose(2, 3)) * (module.head_dim ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:  # transformers builds a boolean mask (True: attend) for a registered name
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, -torch.inf)
        else:
            weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=query.dtype)
    return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights


def register_float64_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(FLOAT64_ATTENTION, eager_float64)
    AttentionMaskInterface.register(FLOAT64_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])  # eager's masks


Capture = dict[str, np.ndarray]


def to_numpy(t: torch.Tensor, copy: bool = True) -> np.ndarray:
    """Detach to NumPy; bf16 is widened to float32 exactly (NumPy has no bf16). ``copy=False`` shares
    the tensor's memory, for a tensor nothing writes to afterwards (the logits HF returns: 1.2 GiB at
    the 12B shapes and 1127 tokens, which a copy would hold twice)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy().copy() if copy else t.cpu().numpy()


def forward_kwargs(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A Gemma 4 forward's keyword arguments from a case's arrays: the prompt's ids and token types, and
    the image's pixel values and patch positions when the case has an image."""
    kw = {"input_ids": torch.from_numpy(inputs["input_ids"]),
          "mm_token_type_ids": torch.from_numpy(inputs["mm_token_type_ids"])}
    if "pixel_values" in inputs:
        kw["pixel_values"] = torch.from_numpy(inputs["pixel_values"])
        kw["image_position_ids"] = torch.from_numpy(inputs["image_position_ids"])
    return kw


def bool_mask(m: torch.Tensor | None, length: int) -> torch.Tensor:
    """A layer's ``attention_mask`` as boolean (B, Lq, Lk), True = may attend: additive float masks
    read as ``== 0``; None (sdpa with no overlay: HF skips the mask and uses is_causal) is causal."""
    if m is None:
        m = torch.ones((1, 1, length, length), dtype=torch.bool).tril()
    m = m[:, 0]  # (B, 1, Lq, Lk) -> (B, Lq, Lk)
    return m if m.dtype == torch.bool else m == 0
