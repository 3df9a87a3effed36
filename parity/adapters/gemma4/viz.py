"""What the HTML report pictures of a Gemma 4 (SigLIP) case: as the unified family's (masks under both
policies, token types, stage groups: ``parity.adapters.gemma4_unified.viz``), with this family's own
stages over the patch grid -- preprocessing, the patch embedder and each encoder layer's output. The
pooler and what follows are over the pooled k x k cells, not the patches: not pictured.
"""

from __future__ import annotations

from parity.adapters.gemma4 import stages
from parity.adapters.gemma4_unified import viz as unified

PATCH_STAGES = tuple(s.name for s in stages.HEAD if s.name != unified.POSITIONS)


def patch_stages(vision_layers: int) -> tuple[str, ...]:
    """The stages over the patch grid of a tower of ``vision_layers`` encoder layers, in forward order."""
    return PATCH_STAGES + tuple(stages.vision_layer_stage(i, "out").name for i in range(vision_layers))


def pictures(ref: dict, cand: dict, extras: dict, inputs: dict, settings, stage_names: list[str],
             vision_layers: int = 0) -> dict:
    """The case's pictures (``Adapter.viz``)."""
    return unified.pictures(ref, cand, extras, inputs, settings, stage_names, patch_stages(vision_layers))
