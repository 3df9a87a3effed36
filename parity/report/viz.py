"""The data behind the HTML report's pictures, in compact JSON encodings. Pure NumPy.

Two encodings, each with its inverse (the runner packs, ``parity.report.html`` unpacks):

- a numeric array: ``{"dtype": "float16"|"float32"|"int16", "shape": [...], "b64": base64 of the
  little-endian bytes}`` (``pack_array`` / ``unpack_array``), optionally with ``"scale"``: the
  values are ``stored * scale`` (a power of two, so float16 keeps 11 significant bits over the
  whole range below the maximum; a nonzero value never rounds to zero);
- a boolean array (masks): ``{"shape": [...], "b64": base64 of zlib(np.packbits(flat))}``
  (``pack_bool`` / ``unpack_bool``) -- a few hundred bytes for a structured (L, L) mask.

``case_viz`` builds a case's ``viz`` entry of the record from the two captures:

- ``patch_error``: per vision stage, the per-patch max |candidate - reference| (max over the
  feature axis; scaled float16), padding rows left out, images concatenated in prompt order; ``positions`` the
  (x, y) of each of those patches (from ``image.position_ids``), ``patches`` the count per image,
  ``padding_max`` the largest error on the padding rows (null for ``vision.soft_tokens``, which
  has none). A stage whose shapes differ between the sides is left out.
- ``masks``: batch 0 of the reference's ``mask.*`` stages under both policies (``official``,
  ``hf-forward``; keyed by layer type), and under ``candidate`` those of the candidate's masks that
  differ from the reference's under the policy in use. ``token_types``: the prompt as run-length
  [[mm_token_type, count], ...] (0 text, 1 image, 2 audio), for the block outlines.
- ``kl_per_position``: KL(reference || candidate) of the prefill logits at each position (nats).
- ``ref_max_abs``: max |reference| of each stage (4 significant digits), aligned with the case's
  ``stages`` list (the largest per-element allowance is ``atol + rtol * ref_max_abs``); null when
  the reference lacks the stage or it is not finite.
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Mapping

import numpy as np

ARRAY_DTYPES = ("float16", "float32", "int16")
VISION_STAGES = ("image.pixel_values", "vision.patch_ln1", "vision.patch_dense", "vision.patch_ln2",
                 "vision.pos_embed", "vision.pos_norm", "vision.mm_prenorm", "vision.soft_tokens")
MASK_PREFIX = "mask."


def pack_array(x: np.ndarray, dtype: str = "float32", scaled: bool = False) -> dict:
    """``scaled`` (float16 only): store ``x / scale`` with a power-of-two ``scale`` that brings the
    largest finite |x| to [2**14, 2**15); nonzero values too small for float16 are kept nonzero."""
    if dtype not in ARRAY_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {ARRAY_DTYPES}")
    if scaled and dtype != "float16":
        raise ValueError("scaled=True is for float16 arrays")
    x = np.asarray(x)
    scale = None
    if scaled:
        finite = np.abs(x[np.isfinite(x)])
        top = float(finite.max()) if finite.size else 0.0
        scale = 2.0 ** (math.frexp(top)[1] - 15) if top > 0 else 1.0
        small = np.float16(2.0**-24)  # the smallest float16 subnormal
        y = (x.astype(np.float64) / scale).astype(np.float16)
        x = np.where((y == 0) & (x != 0), np.copysign(small, x).astype(np.float16), y)
    a = np.ascontiguousarray(x, dtype=np.dtype(dtype).newbyteorder("<"))
    out = {"dtype": dtype, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}
    return out if scale is None else out | {"scale": scale}


def unpack_array(d: Mapping) -> np.ndarray:
    """The array of ``pack_array`` (float32 when scaled)."""
    if d["dtype"] not in ARRAY_DTYPES:
        raise ValueError(f"dtype={d['dtype']!r} is not one of {ARRAY_DTYPES}")
    raw = base64.b64decode(d["b64"])
    x = np.frombuffer(raw, dtype=np.dtype(d["dtype"]).newbyteorder("<")).reshape(d["shape"]).astype(d["dtype"])
    return x if "scale" not in d else x.astype(np.float32) * np.float32(d["scale"])


def pack_bool(x: np.ndarray) -> dict:
    bits = np.packbits(np.asarray(x, dtype=bool).reshape(-1))
    return {"shape": list(np.shape(x)), "b64": base64.b64encode(zlib.compress(bits.tobytes(), 9)).decode("ascii")}


def unpack_bool(d: Mapping) -> np.ndarray:
    n = int(np.prod(d["shape"], dtype=np.int64))
    bits = np.frombuffer(zlib.decompress(base64.b64decode(d["b64"])), dtype=np.uint8)
    return np.unpackbits(bits, count=n).astype(bool).reshape(d["shape"])


def _row_error(cand: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Max |cand - ref| over every axis after the token axis: (n_images, T, ...) -> (n_images, T)."""
    diff = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
    return diff.reshape(diff.shape[0], diff.shape[1], -1).max(-1)


def patch_error(cand: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> dict | None:
    """Per-patch error of the vision stages over each image's patch grid (None: no image)."""
    positions = ref.get("image.position_ids")
    if positions is None:
        return None
    valid = (positions != -1).all(-1)  # (n_images, T)
    out = {"positions": pack_array(positions[valid], "int16"), "patches": [int(v) for v in valid.sum(-1)],
           "stages": {}, "padding_max": {}}
    for name in VISION_STAGES:
        if name not in cand or name not in ref or cand[name].shape != ref[name].shape:
            continue
        if name == "vision.soft_tokens":  # (1, N, hidden): padding rows already dropped
            if ref[name].shape[1] != int(valid.sum()):
                continue
            err, pad = _row_error(cand[name], ref[name])[0], None
        else:  # (n_images, T, ...) with padding rows
            if ref[name].shape[:2] != valid.shape:
                continue
            rows = _row_error(cand[name], ref[name])
            err, pad = rows[valid], float(rows[~valid].max()) if (~valid).any() else None
        out["stages"][name] = pack_array(err, "float16", scaled=True)
        out["padding_max"][name] = pad
    return out


def _runs(types: np.ndarray | None) -> list[list[int]]:
    """The prompt's token types as run-length [type, count] pairs ([] when the family has none)."""
    runs: list[list[int]] = []
    for t in ([] if types is None else types.reshape(-1).tolist()):
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([int(t), 1])
    return runs


def masks(cand: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray],
          policy: str, token_types: np.ndarray) -> dict:
    """Reference masks under both policies (``ref``: the policy in use; ``other``: the other one),
    and the candidate's masks that differ from the reference's."""
    other_policy = "hf-forward" if policy == "official" else "official"
    out: dict = {policy: {}, other_policy: {}, "candidate": {}, "token_types": _runs(token_types)}
    for name in sorted(k for k in ref if k.startswith(MASK_PREFIX)):
        kind = name[len(MASK_PREFIX):]
        r = np.asarray(ref[name])[0].astype(bool)  # (B, L, L) -> batch 0
        out[policy][kind] = pack_bool(r)
        if name in other:
            out[other_policy][kind] = pack_bool(np.asarray(other[name])[0])
        if name in cand:
            c = np.asarray(cand[name])[0].astype(bool)
            if c.shape != r.shape or not np.array_equal(c, r):
                out["candidate"][kind] = pack_bool(c)
    return out


def ref_max_abs(x: np.ndarray | None) -> float | None:
    """max |reference| of a stage at 4 significant digits (None: absent, empty or non-finite)."""
    if x is None or x.size == 0:
        return None
    top = max(float(x.max()), -float(x.min()))  # two passes, no |x| copy (a 1.2 GB one for 12B logits)
    return float(f"{top:.4g}") if math.isfinite(top) else None  # NaN propagates through max and min


def case_viz(cand: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], other_masks: Mapping[str, np.ndarray],
             policy: str, token_types: np.ndarray, kl: np.ndarray | None, stage_names: list[str],
             ref_max: Mapping[str, float | None] | None = None) -> dict:
    """``ref_max``: max |reference| by stage, when the captures are gone (a streamed run computes it
    stage by stage); otherwise taken from ``ref``."""
    return {"patch_error": patch_error(cand, ref),
            "masks": masks(cand, ref, other_masks, policy, token_types),
            "kl_per_position": None if kl is None else pack_array(kl, "float32"),
            "ref_max_abs": [ref_max.get(n) if ref_max is not None else ref_max_abs(ref.get(n)) for n in stage_names]}
