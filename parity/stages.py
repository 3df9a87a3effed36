"""The stage table: every public stage, once, in forward order (DESIGN.md "Stages").

Each stage names its tolerance class and where the HF reference produces it: a module path under
``Gemma4UnifiedForConditionalGeneration`` read as the module's ``output`` or ``input`` (forward
hook), a key of the HF image processor's output (``processor``), or the result of a public HF
method (``result``). The rmlx side produces the same name at its ``tap`` point.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from rmlx.errors import InputError


@dataclass(frozen=True)
class Stage:
    name: str  # public name, e.g. "vision.patch_ln1"
    tol: str  # tolerance class in parity.tolerances, e.g. "layernorm", "exact"
    hf: str  # module path, processor key, or HF method
    read: str  # "output" | "input" (forward hook), "processor", "result"
    what: str = ""


VISION: tuple[Stage, ...] = (
    Stage("image.pixel_values", "exact", "pixel_values", "processor",
          "48x48x3 HWC patches in raster order, padded with zero rows to max_soft_tokens"),
    Stage("image.position_ids", "exact", "image_position_ids", "processor",
          "(x, y) of every patch; (-1, -1) on padding rows"),
    Stage("vision.patch_ln1", "layernorm", "model.embed_vision.patch_ln1", "output", "LayerNorm(6912), eps 1e-5"),
    Stage("vision.patch_dense", "dense", "model.embed_vision.patch_dense", "output", "Linear(6912 -> mm) + bias"),
    Stage("vision.patch_ln2", "layernorm", "model.embed_vision.patch_ln2", "output", "LayerNorm(mm), eps 1e-5"),
    Stage("vision.pos_embed", "posemb", "model.embed_vision.pos_norm", "input",
          "after adding table[x, 0] + table[y, 1] (the input of pos_norm)"),
    Stage("vision.pos_norm", "layernorm", "model.embed_vision.pos_norm", "output", "LayerNorm(mm), eps 1e-5"),
    Stage("vision.mm_prenorm", "rmsnorm", "model.embed_vision.multimodal_embedder.embedding_pre_projection_norm",
          "output", "RMSNorm without weight, eps 1e-6"),
    Stage("vision.soft_tokens", "projection", "model.get_image_features", "result",
          "Linear(mm -> hidden), padding rows dropped, images concatenated: (1, N, hidden)"),
)

STAGES: tuple[Stage, ...] = VISION
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def select(patterns: list[str] | None, stages: tuple[Stage, ...] = STAGES) -> tuple[Stage, ...]:
    """Stages whose name matches any glob in ``patterns`` (all when None), in forward order."""
    if not patterns:
        return stages
    picked = tuple(s for s in stages if any(fnmatch.fnmatchcase(s.name, p) for p in patterns))
    if not picked:
        raise InputError(f"--stages {' '.join(patterns)} matches no stage. "
                         "Note: run 'rmlx-parity stages' to list the stage names")
    return picked


def hook_points(stages: tuple[Stage, ...]) -> dict[str, tuple[str, str]]:
    """{stage name: (module path, "output" | "input")} for the stages read through forward hooks."""
    return {s.name: (s.hf, s.read) for s in stages if s.read in ("output", "input")}
