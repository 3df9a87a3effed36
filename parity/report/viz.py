"""The data behind the HTML report's pictures, in compact JSON encodings. Pure NumPy.

Two encodings, each with its inverse (the runner packs, ``parity.report.html`` unpacks):

- a numeric array: ``{"dtype": "float16"|"float32"|"int16", "shape": [...], "b64": base64 of the
  little-endian bytes}`` (``pack_array`` / ``unpack_array``), optionally with ``"scale"``: the
  values are ``stored * scale`` (a power of two, so float16 keeps 11 significant bits over the
  whole range below the maximum; a nonzero value never rounds to zero);
- a boolean array (masks): ``{"shape": [...], "b64": base64 of zlib(np.packbits(flat))}``
  (``pack_bool`` / ``unpack_bool``) -- a few hundred bytes for a structured (L, L) mask.

``case_viz`` builds a case's ``viz`` entry of the record: what every case has --

- ``kl_per_position``: KL(reference || candidate) of the prefill logits at each position (nats);
- ``ref_max_abs``: max |reference| of each stage (4 significant digits), aligned with the case's
  ``stages`` list (the largest per-element allowance is ``atol + rtol * ref_max_abs``); null when
  the reference lacks the stage or it is not finite --

and what the case's family pictures (its adapter's ``viz``, built with the generic builders here;
each entry carries its own labels, so the HTML report renders it knowing no family):

- ``patch_error`` (:func:`patch_error`): per stage over a patch grid, the per-patch max
  |candidate - reference| (max over the feature axes; scaled float16), padding rows left out, images
  concatenated in prompt order; ``positions`` the (x, y) of each of those patches (from the stage the
  family names, -1 on padding rows), ``patches`` the count per image, ``padding_max`` the largest
  error on the padding rows (null for a stage whose padding rows are already dropped). A stage whose
  shapes differ between the sides, or whose rows are not the grid's, is left out.
- ``masks`` (:func:`masks`): batch 0 of the reference's mask stages under each named view the family
  gives (``views``, in order; ``in_use`` the one the run compares against; keyed by the mask's label),
  and under ``candidate`` those of the candidate's masks that differ from the reference's in use
  (``candidate_view``: what the candidate ran). ``token_types``: the prompt as run-length
  [[type, count], ...], and ``token_legend``: [[type, name, colour], ...] (type 0 is plain: not outlined).
- ``stage_groups`` (:func:`stage_groups`): the case's ``stages`` as run-length [[group, count], ...],
  the labels under the stage plot's axis.
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

ARRAY_DTYPES = ("float16", "float32", "int16")
# keys of ``masks`` beside the views (a view may not take one of these names)
MASK_KEYS = ("candidate", "token_types", "token_legend", "views", "in_use", "candidate_view")


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


def patch_error(cand: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], stages: Iterable[str],
                positions: str) -> dict | None:
    """Per-patch error of ``stages`` over each image's patch grid (None: the reference has no
    ``positions``, the (n_images, T, 2) stage of each row's (x, y), -1 on padding rows). A stage's rows
    are the grid's rows, (n_images, T, ...), or the patches without padding, images concatenated,
    (1, N, ...)."""
    grid = ref.get(positions)
    if grid is None:
        return None
    valid = (grid != -1).all(-1)  # (n_images, T)
    n = int(valid.sum())
    out = {"positions": pack_array(grid[valid], "int16"), "patches": [int(v) for v in valid.sum(-1)],
           "stages": {}, "padding_max": {}}
    for name in stages:
        if name not in cand or name not in ref or cand[name].shape != ref[name].shape:
            continue
        shape = ref[name].shape
        if shape[:2] == valid.shape:  # (n_images, T, ...) with padding rows
            rows = _row_error(cand[name], ref[name])
            err, pad = rows[valid], float(rows[~valid].max()) if (~valid).any() else None
        elif len(shape) >= 2 and shape[:2] == (1, n):  # (1, N, ...): padding rows already dropped
            err, pad = _row_error(cand[name], ref[name])[0], None
        else:
            continue
        out["stages"][name] = pack_array(err, "float16", scaled=True)
        out["padding_max"][name] = pad
    return out


def _runs(values: Iterable) -> list[list]:
    """Consecutive equal values as run-length [value, count] pairs."""
    runs: list[list] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return runs


def masks(cand: Mapping[str, np.ndarray], views: Mapping[str, Mapping[str, np.ndarray]], stages: Mapping[str, str],
          in_use: str, candidate_view: str | None, token_types: np.ndarray | None,
          legend: Iterable[tuple[int, str, str]] = ()) -> dict:
    """The reference's masks (``stages``: mask stage -> label) under each view (``views``: name ->
    capture, in the order shown; ``in_use`` is the one compared), the candidate's that differ from the
    view in use, and the prompt's token types with their ``legend`` (type, name, colour)."""
    bad = sorted(set(views) & set(MASK_KEYS))
    if bad or in_use not in views:
        raise ValueError(f"mask views {list(views)}: {bad or in_use!r} is reserved or missing")
    out: dict[str, Any] = {v: {} for v in views}
    out |= {"candidate": {}, "views": list(views), "in_use": in_use, "candidate_view": candidate_view,
            "token_types": _runs([] if token_types is None else [int(x) for x in token_types.reshape(-1)]),
            "token_legend": [[int(t), str(name), str(colour)] for t, name, colour in legend]}
    ref = views[in_use]
    for name, label in stages.items():
        if name not in ref:
            continue
        r = np.asarray(ref[name])[0].astype(bool)  # (B, L, L) -> batch 0
        out[in_use][label] = pack_bool(r)
        for view, capture in views.items():
            if view != in_use and name in capture:
                out[view][label] = pack_bool(np.asarray(capture[name])[0])
        if name in cand:
            c = np.asarray(cand[name])[0].astype(bool)
            if c.shape != r.shape or not np.array_equal(c, r):
                out["candidate"][label] = pack_bool(c)
    return out


def stage_groups(names: Iterable[str], group: Callable[[str], str]) -> list[list]:
    """The stage plot's axis labels: ``group`` of each stage name, run-length [[group, count], ...]."""
    return _runs(group(n) for n in names)


def ref_max_abs(x: np.ndarray | None) -> float | None:
    """max |reference| of a stage at 4 significant digits (None: absent, empty or non-finite)."""
    if x is None or x.size == 0:
        return None
    top = max(float(x.max()), -float(x.min()))  # two passes, no |x| copy (a 1.2 GB one for 12B logits)
    return float(f"{top:.4g}") if math.isfinite(top) else None  # NaN propagates through max and min


Pictures = Callable[..., Mapping]  # an adapter's ``viz(ref, cand, extras, inputs, settings, stage_names)``


def case_viz(pictures: Pictures | None, cand: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray],
             extras: Mapping, inputs: Mapping[str, np.ndarray], settings, kl: np.ndarray | None,
             stage_names: list[str], ref_max: list[float | None]) -> dict:
    """A case's ``viz``: the family's pictures (``pictures``, its adapter's ``viz``: called with the kept
    captures, the reference's ``extras``, the case's inputs and settings and its stage names; none
    when None), the per-position KL and ``ref_max`` (max |reference| of each of ``stage_names``)."""
    own = {} if pictures is None else dict(pictures(ref, cand, extras, inputs, settings, stage_names))
    return {**own, "kl_per_position": None if kl is None else pack_array(kl, "float32"), "ref_max_abs": list(ref_max)}
