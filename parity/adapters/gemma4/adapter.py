"""Gemma 4 (SigLIP-style vision) adapter: HF ``Gemma4ForConditionalGeneration`` (reference), ``rmlx.models.gemma4``
(candidate), the float64 NumPy oracle of the vision path (``reference/gemma4/numpy_oracle.py``).

Scenarios are the unified family's (same names, same prompts): one per battery image plus the special
cases; the ones with audio are not supported (this port has no audio tower).
"""

from __future__ import annotations

from pathlib import Path

import rmlx  # noqa: F401  (before mlx: it loads the BLAS MLX calls, rmlx/blas.py)

# isort: split
import mlx.core as mx
import numpy as np

from parity.adapter import Scenario
from parity.adapters.gemma4.stages import stages_for
from parity.adapters.gemma4_unified.adapter import decode_steps, preprocessed, prompt_ids
from parity.capture import Capture, Recorder
from parity.stages import Stage, hook_points
from reference.gemma4 import hf as ghf
from rmlx.errors import InputError
from rmlx.models.gemma4 import config as gconfig
from rmlx.models.gemma4 import image as gimage
from rmlx.models.gemma4 import model as gmodel
from rmlx.tap import tapping


def supports(args: gconfig.ModelArgs, scenario: Scenario) -> bool:
    """No audio tower; images need a vision tower."""
    return not scenario.has_audio and (not scenario.images or args.vision is not None)


class Gemma4Adapter:
    """One checkpoint, both sides loaded once and reused for every case."""

    hf_float = None  # no quantized run: no unquantized twin
    quantized: frozenset[str] = frozenset()

    def __init__(self, model_dir: Path, dtype: str = "float32", attn_implementation: str = "eager",
                 threads: int = 1):
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.candidate_model = self.load_candidate()  # strict: a bad checkpoint fails here
        self.args: gconfig.ModelArgs = self.candidate_model.args
        self.hf = ghf.Runner(self.model_dir, dtype, attn_implementation, threads)

    def load_candidate(self):
        """The port's model of this checkpoint, loaded afresh (under whatever defect is planted now)."""
        return gmodel.load_model(self.model_dir, self.dtype)

    def supports(self, scenario: Scenario) -> bool:
        return supports(self.args, scenario)

    def stages(self, scenario: Scenario) -> tuple[Stage, ...]:
        v = self.args.vision
        return stages_for(self.args.text, None if v is None else v.num_hidden_layers,
                          v is not None and v.standardize, bool(scenario.images), self.quantized)

    def _pre(self, scenario: Scenario, decoded: dict[Path, np.ndarray], max_soft_tokens: int) -> dict:
        if not scenario.images:
            return {}
        pre = preprocessed(self, scenario, decoded, max_soft_tokens,
                           lambda images: self.hf.preprocess(images, max_soft_tokens))
        v = self.args.vision
        top = int(pre["image_position_ids"].max())
        if top >= v.position_embedding_size:
            raise InputError(f"{', '.join(map(str, scenario.images))}: position id {top} is outside the position "
                             f"table (position_embedding_size={v.position_embedding_size}); use a smaller "
                             "--max-soft-tokens")
        return pre

    def inputs(self, scenario: Scenario, decoded: dict[Path, np.ndarray], settings
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(case inputs, the reference's preprocessing). The prompt is built from the reference's soft-token
        counts: each image becomes <boi> <image> * n <eoi>; both sides get the same ids."""
        pre = self._pre(scenario, decoded, settings.max_soft_tokens)
        unsupported = sorted({kind for kind, _ in scenario.parts} - {"text", "image"})
        if unsupported:
            raise InputError(f"scenario '{scenario.name}': {unsupported} parts are not supported by the gemma4 port")
        input_ids = np.array([prompt_ids(scenario, self.args, pre.get("num_soft_tokens_per_image", []))], np.int64)
        # the reference types the tokens; the candidate types them itself (Model.token_types)
        return {"input.input_ids": input_ids, "input.mm_token_type_ids": self.hf.token_types(input_ids)}, pre

    def reference(self, scenario: Scenario, inputs: dict[str, np.ndarray], pre: dict[str, np.ndarray], settings,
                  decode_steps: int, unquantized: bool = False, other_masks: Capture | None = None
                  ) -> tuple[Capture, list[np.ndarray], list[int], float]:
        """HF's capture of the case under the run's mask policy, then greedy decode steps with HF's cache."""
        if unquantized:
            raise InputError("the gemma4 family has no quantized run")
        feed = {"input_ids": inputs["input.input_ids"], "mm_token_type_ids": inputs["input.mm_token_type_ids"]}
        if scenario.images:
            feed["pixel_values"], feed["image_position_ids"] = pre["pixel_values"], pre["image_position_ids"]
        points = hook_points(self.stages(scenario))
        cap, steps, tokens, consistency = self.hf.forward(feed, settings.mask_policy, points, decode_steps, other_masks)
        if scenario.images:
            cap["image.pixel_values"], cap["image.position_ids"] = pre["pixel_values"], pre["image_position_ids"]
        return cap, steps, tokens, consistency

    def candidate(self, scenario: Scenario, inputs: dict[str, np.ndarray], decoded: dict[Path, np.ndarray],
                  settings, tokens: list[int], teacher: Capture | None = None) -> tuple[Capture, list[np.ndarray]]:
        """Prefill under the tap recorder (teacher-forced when ``teacher`` is given; the port preprocesses its
        own images), then one decode step per reference token with the port's KV cache."""
        model = self.candidate_model
        recorder = Recorder(teacher)
        cache = model.make_cache()
        with tapping(recorder):
            pixel_values = position_ids = None
            if scenario.images:
                v = self.args.vision
                pixel_values, position_ids, _ = gimage.preprocess_batch(
                    [decoded[p] for p in scenario.images], settings.max_soft_tokens, v.patch_size,
                    v.pooling_kernel_size)
            logits = model(inputs["input.input_ids"], None, pixel_values, position_ids, cache, 0,
                           settings.candidate_policy)
            mx.eval(logits)
        return recorder.capture, decode_steps(model, cache, inputs["input.input_ids"].shape[1], tokens)

    def oracle(self, scenario: Scenario, decoded: dict[Path, np.ndarray], settings) -> Capture:
        """Float64 vision path (``reference/gemma4/numpy_oracle.py``) on the reference's preprocessed pixels
        (preprocessing itself is compared exactly against HF's processor)."""
        if not scenario.images:
            return {}
        from reference.gemma4.numpy_oracle import vision

        pre = self._pre(scenario, decoded, settings.max_soft_tokens)
        return vision(self.model_dir, pre["pixel_values"], pre["image_position_ids"])
