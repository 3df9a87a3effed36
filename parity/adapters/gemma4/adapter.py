"""Gemma 4 (SigLIP-style vision) adapter: HF ``Gemma4ForConditionalGeneration`` (reference), ``rmlx.models.gemma4``
(candidate), the float64 NumPy oracle of the vision path (``reference/gemma4/numpy_oracle.py``).

Scenarios are the unified family's (same names, same prompts): one per battery image plus the special
cases; the ones with audio are not supported (this port has no audio tower).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import rmlx  # noqa: F401  (before mlx: it loads the BLAS MLX calls, rmlx/blas.py)

# isort: split
import mlx.core as mx
import numpy as np

from parity.adapter import Scenario
from parity.adapters.gemma4 import supports, viz
from parity.adapters.gemma4.stages import stages_for
from parity.adapters.gemma4_unified.adapter import decode_steps, other_policy_masks, preprocessed, prompt_ids
from parity.capture import Capture, Recorder
from parity.stages import Stage, hook_points
from reference.gemma4 import hf as ghf
from rmlx.errors import InputError
from rmlx.models.gemma4 import config as gconfig
from rmlx.models.gemma4 import image as gimage
from rmlx.models.gemma4 import model as gmodel
from rmlx.tap import tapping


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
                  decode_steps: int, unquantized: bool = False
                  ) -> tuple[Capture, list[np.ndarray], list[int], float, dict]:
        """HF's capture of the case under the run's mask policy, then greedy decode steps with HF's cache; the
        extras (for :meth:`viz`): the masks under the other policy, built by the same forward."""
        if unquantized:
            raise InputError("the gemma4 family has no quantized run")
        feed = {"input_ids": inputs["input.input_ids"], "mm_token_type_ids": inputs["input.mm_token_type_ids"]}
        if scenario.images:
            feed["pixel_values"], feed["image_position_ids"] = pre["pixel_values"], pre["image_position_ids"]
        points = hook_points(self.stages(scenario))
        other: Capture = {}
        cap, steps, tokens, consistency = self.hf.forward(feed, settings.mask_policy, points, decode_steps, other)
        if scenario.images:
            cap["image.pixel_values"], cap["image.position_ids"] = pre["pixel_values"], pre["image_position_ids"]
        return cap, steps, tokens, consistency, other_policy_masks(settings, other)

    def viz(self, ref: Capture, cand: Capture, extras: dict, inputs: Capture, settings, stage_names: list[str]
            ) -> dict:
        """The case's pictures in the HTML report (``parity.adapters.gemma4.viz``)."""
        v = self.args.vision
        return viz.pictures(ref, cand, extras, inputs, settings, stage_names, 0 if v is None else v.num_hidden_layers)

    def candidate(self, scenario: Scenario, inputs: dict[str, np.ndarray], decoded: dict[Path, np.ndarray],
                  settings, tokens: list[int], teacher: Capture | None = None) -> tuple[Capture, list[np.ndarray]]:
        """Prefill under the tap recorder (teacher-forced when ``teacher`` is given; the port preprocesses its
        own images), then one decode step per reference token with the port's KV cache."""
        model = self.candidate_model
        recorder = Recorder(teacher, defer=True)
        cache = model.make_cache()
        with tapping(recorder):
            pixel_values = position_ids = None
            if scenario.images:
                v = self.args.vision
                pixel_values, position_ids, _ = gimage.preprocess_batch(
                    [decoded[p] for p in scenario.images], settings.max_soft_tokens, v.patch_size,
                    v.pooling_kernel_size)
            logits = model(inputs["input.input_ids"], None, pixel_values, position_ids, cache, 0,
                           settings.candidate_mask_policy)
            mx.eval(logits)
        return recorder.settled(), decode_steps(model, cache, inputs["input.input_ids"].shape[1], tokens)

    @cached_property
    def hf64(self) -> ghf.Runner:
        """HF's model in float64, softmax included (``reference.torch_ops.eager_float64``), its RMSNorms and RoPE
        in float64 too (``reference.gemma4.hf.compute_in_float64``): the decoder's oracle."""
        return ghf.Runner(self.model_dir, "float64", "eager_float64")

    def oracle(self, scenario: Scenario, decoded: dict[Path, np.ndarray], settings) -> Capture:
        """Float64 values: the vision path in NumPy (``reference/gemma4/numpy_oracle.py``) on the reference's
        preprocessed pixels (preprocessing itself is compared exactly against HF's processor), and every
        other stage from HF's own model run in float64 on the same inputs, its soft tokens the NumPy
        oracle's, when the candidate is fp32 (the unified family's condition: a bf16 reference's rounding
        has no fixed ratio to another correct bf16 implementation's; this family has no quantized run)."""
        cap: Capture = {}
        if scenario.images:
            from reference.gemma4.numpy_oracle import vision

            pre = self._pre(scenario, decoded, settings.max_soft_tokens)
            cap = vision(self.model_dir, pre["pixel_values"], pre["image_position_ids"])
        if settings.dtype == "float32" and not self.quantized:
            cap = self._hf64_capture(scenario, decoded, settings, cap.get("vision.soft_tokens")) | cap
        return cap

    def _hf64_capture(self, scenario: Scenario, decoded: dict[Path, np.ndarray], settings,
                      soft_tokens: np.ndarray | None) -> Capture:
        """The decoder's stages from the float64 model, given the NumPy oracle's ``soft_tokens`` (1, N, H) for the
        images (HF's vision pooler and standardisation compute in float32 whatever the dtype): its vision
        tower does not run."""
        inputs, _ = self.inputs(scenario, decoded, settings)
        feed = {"input_ids": inputs["input.input_ids"], "mm_token_type_ids": inputs["input.mm_token_type_ids"]}
        if soft_tokens is not None:
            feed["image_features"] = soft_tokens[0]
        points = {k: v for k, v in hook_points(self.stages(scenario)).items()
                  if v[1] != "mask" and not k.startswith(("image.", "vision."))}
        cap, *_ = self.hf64.forward(feed, settings.mask_policy, points, 0, consistency=False)
        return {k: v for k, v in cap.items() if np.issubdtype(v.dtype, np.floating)}
