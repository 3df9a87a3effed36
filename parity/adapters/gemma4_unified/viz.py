"""What the HTML report pictures of a Gemma 4 unified case, from the stage table: the per-patch error of
the vision embedder's stages over each image's patch grid, the two decoder masks under both mask
policies, the prompt's token types, and the stage plot's groups. Built with the core's generic
builders (``parity.report.viz``); the record carries every label, so the report needs no Gemma code.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from parity.adapters.gemma4_unified import MASK_POLICIES, stages
from parity.report import viz

POSITIONS = "image.position_ids"  # (n_images, T, 2): each patch row's (x, y), -1 on padding rows
PATCH_STAGES = tuple(s.name for s in stages.VISION if s.name != POSITIONS)  # every row a patch of the grid
MASKS = {stages.mask_stage(kind, None).name: kind for kind in stages.MASK_KINDS}  # stage -> label
# HF's mm_token_type_ids: 0 text (boi/eoi too), 1 image, 2 video, 3 audio; (type, name, colour)
TOKEN_TYPES = ((0, "text", "#1f3a5f"), (1, "image", "#e8590c"), (2, "video", "#8250df"), (3, "audio", "#1a7f37"))
OTHER_MASKS = "mask_views"  # the reference's extras: {policy: its mask stages} of the policies not in use


def group(name: str) -> str:
    """A stage's group under the stage plot: its branch (vision, audio), the token embeddings, the
    masks, its decoder layer (L3), or the head."""
    if name.startswith(("image.", "vision.")):
        return "vision"
    if name.startswith("audio."):
        return "audio"
    if name.startswith(("text.embed", "text.inputs")):
        return "embed"
    if name.startswith("mask."):
        return "mask"
    if name.startswith("layers."):
        return "L" + name.split(".")[1]
    return "head"


def pictures(ref: dict, cand: dict, extras: dict, inputs: dict, settings, stage_names: list[str],
             patch_stages: Iterable[str] = PATCH_STAGES) -> dict:
    """The case's pictures (``Adapter.viz``): ``extras[OTHER_MASKS]`` holds the reference's masks under the
    policies not in use (none in a streamed run: that view is then empty)."""
    in_use = settings.mask_policy
    others = extras.get(OTHER_MASKS, {})
    views = {in_use: ref} | {p: others.get(p, {}) for p in MASK_POLICIES if p != in_use}
    types = inputs.get("input.mm_token_type_ids")
    return {"patch_error": viz.patch_error(cand, ref, patch_stages, POSITIONS),
            "masks": viz.masks(cand, views, MASKS, in_use, settings.candidate_mask_policy,
                               None if types is None else np.asarray(types), TOKEN_TYPES),
            "stage_groups": viz.stage_groups(stage_names, group)}
