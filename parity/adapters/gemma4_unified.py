"""Gemma 4 unified adapter: HF transformers (reference), rmlx (candidate), NumPy float64 (oracle)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import mlx.core as mx
import numpy as np

from parity.capture import Capture, Recorder
from parity.stages import VISION, Stage, hook_points
from reference import numpy_ops
from reference.hf import HFRunner
from rmlx import image as rimage
from rmlx.load import load_model
from rmlx.tap import tapping


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # display name (the checkpoint folder's name)
    model_dir: Path
    image: Path
    max_soft_tokens: int
    dtype: str
    mode: str  # "free" | "teacher"


class Gemma4UnifiedAdapter:
    """One checkpoint, both sides loaded once and reused for every case."""

    stages: tuple[Stage, ...] = VISION

    def __init__(self, model_dir: Path, dtype: str = "float32", attn_implementation: str = "eager"):
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.candidate_model = load_model(self.model_dir, dtype)  # strict: bad checkpoints fail here
        self.hf = HFRunner(self.model_dir, dtype, attn_implementation)

    @cached_property
    def oracle_weights(self) -> dict[str, np.ndarray]:
        return numpy_ops.load_vision_weights(self.model_dir)

    def prompt(self, n_soft: int) -> dict[str, np.ndarray]:
        """The case's text: [bos, 10, 11, boi, image x n, eoi, 12, 13]; mm_token_type_ids 1 on image slots."""
        cfg = self.candidate_model.args
        ids = [2, 10, 11, cfg.boi_token_id] + [cfg.image_token_id] * n_soft + [cfg.eoi_token_id, 12, 13]
        input_ids = np.array([ids], np.int64)
        return {"input.input_ids": input_ids,
                "input.mm_token_type_ids": (input_ids == cfg.image_token_id).astype(np.int64)}

    def reference(self, image: np.ndarray, max_soft_tokens: int, stages: tuple[Stage, ...]) -> Capture:
        pre = self.hf.preprocess(image, max_soft_tokens)
        cap: Capture = {s.name: pre[s.hf] for s in stages if s.read == "processor"}
        soft, hooked = self.hf.image_features(pre["pixel_values"], pre["image_position_ids"], hook_points(stages))
        cap.update(hooked)
        cap["vision.soft_tokens"] = soft
        return {k: cap[k] for k in (s.name for s in stages) if k in cap}

    def candidate(self, image: np.ndarray, max_soft_tokens: int, teacher: Capture | None = None) -> Capture:
        recorder = Recorder(teacher)
        with tapping(recorder):
            pixel_values, position_ids, _ = rimage.preprocess(image, max_soft_tokens)
            soft = self.candidate_model.vision_embedder(mx.array(pixel_values), mx.array(position_ids))
            mx.eval(soft)
        return recorder.capture

    def oracle(self, image: np.ndarray, max_soft_tokens: int) -> Capture:
        th, tw = numpy_ops.soft_token_grid(image.shape[0], image.shape[1], max_soft_tokens)
        resized = image if image.shape[:2] == (th, tw) else self.hf.resize(image, th, tw)
        pixel_values, positions = numpy_ops.patches(resized, max_soft_tokens)
        cfg = self.candidate_model.args.vision
        cap = numpy_ops.vision_embedder(self.oracle_weights, pixel_values, positions, cfg.rms_norm_eps)
        cap["image.pixel_values"], cap["image.position_ids"] = pixel_values, positions
        return cap
