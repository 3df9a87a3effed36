"""Gemma 4 unified adapter: HF transformers (reference), rmlx (candidate), NumPy float64 (oracle).

A case is one checkpoint x one *scenario* (``parity.adapters.gemma4_unified.scenarios``): a prompt
made of text ids, images and audio frames.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import rmlx  # noqa: F401  (before mlx: it loads the BLAS MLX calls, rmlx/blas.py)

# isort: split
import mlx.core as mx
import numpy as np

from parity.adapter import Scenario
from parity.adapters.gemma4_unified import MASK_POLICIES, viz
from parity.adapters.gemma4_unified.scenarios import image_scenario, special_scenarios, supports  # noqa: F401
from parity.adapters.gemma4_unified.stages import stages_for
from parity.capture import Capture, Recorder, to_numpy
from parity.stages import Stage, hook_points
from reference.gemma4_unified import numpy_oracle
from reference.gemma4_unified.hf import HFRunner
from rmlx.errors import InputError
from rmlx.models.gemma4_unified import image as rimage
from rmlx.models.gemma4_unified.config import ModelArgs
from rmlx.models.gemma4_unified.load import load_model
from rmlx.nn.quant import dequantized_name
from rmlx.tap import tapping

AUDIO_FRAME = 640  # samples per audio soft token (16 kHz / 25 fps)


def hf_module(path: str) -> str:
    """An rmlx module path -> the HF module path under Gemma4UnifiedForConditionalGeneration."""
    if path.startswith("vision_embedder."):
        return "model.embed_vision." + path[len("vision_embedder."):]
    return "model." + path


def prompt_ids(scenario: Scenario, args, image_counts) -> list[int]:
    """The prompt's token ids: text parts as given (an id that is a special id of the config moves to
    the next plain id), each image <boi> <image> * n <eoi> with n from
    ``image_counts`` (the reference's soft-token count per image, in order), each audio part
    <boa> <audio> * frames <eoa>."""
    counts = iter(int(n) for n in image_counts)
    special = {getattr(args, k) for k in ("image_token_id", "video_token_id", "audio_token_id", "boi_token_id",
                                          "eoi_token_id", "boa_token_id", "eoa_token_index") if hasattr(args, k)}
    ids: list[int] = []
    for kind, value in scenario.parts:
        if kind == "text":  # a text id that is one of this config's special ids moves to the next plain one
            ids += [next(j for j in range(int(i), int(i) + len(special) + 1) if j not in special) for i in value]
        elif kind == "image":
            ids += [args.boi_token_id] + [args.image_token_id] * next(counts) + [args.eoi_token_id]
        else:
            ids += [args.boa_token_id] + [args.audio_token_id] * int(value) + [args.eoa_token_index]
    return ids


def decode_steps(model, cache, length: int, tokens: list[int]) -> list[np.ndarray]:
    """The candidate's logits at each greedy decode step after a prefill of ``length`` tokens, one
    reference token at a time, with the model's own KV cache."""
    return [to_numpy(model(np.array([[token]]), None, cache=cache, offset=length + s))
            for s, token in enumerate(tokens)]


def preprocessed(adapter, scenario: Scenario, decoded: dict[Path, np.ndarray], max_soft_tokens: int, compute
                 ) -> dict[str, np.ndarray]:
    """The reference's preprocessing of a case's images (``compute(images)``), done once: a case asks
    for it for its inputs and again for its float64 oracle. The adapter keeps the last case's."""
    images = tuple(decoded[p] for p in scenario.images)
    last = getattr(adapter, "_last_preprocessed", None)
    if (last is not None and last[0] == (scenario, max_soft_tokens) and len(last[1]) == len(images)
            and all(a is b for a, b in zip(last[1], images, strict=True))):
        return last[2]
    pre = compute(list(images))
    adapter._last_preprocessed = ((scenario, max_soft_tokens), images, pre)  # holds the images: no id reuse
    return pre


def image_stages(cap: Capture, pre: dict[str, np.ndarray]) -> None:
    """The reference's image stages that are no module's output: the processor's arrays, and the soft
    tokens with the padding rows dropped and the images concatenated, (1, N, H), as HF scatters them."""
    cap["image.pixel_values"], cap["image.position_ids"] = pre["pixel_values"], pre["image_position_ids"]
    valid = (pre["image_position_ids"] != -1).all(-1).reshape(-1)
    proj = cap["vision.soft_tokens"]
    cap["vision.soft_tokens"] = proj.reshape(-1, proj.shape[-1])[valid][None]  # (B, P, H) -> (1, N, H)


def other_policy_masks(settings, masks: Capture) -> dict:
    """The reference's extras: ``masks`` (the mask stages under the policy not in use) keyed by that policy."""
    other = next(p for p in MASK_POLICIES if p != settings.mask_policy)
    return {viz.OTHER_MASKS: {other: masks}}


def audio_frames(n: int, seed: int = 0) -> np.ndarray:
    """Deterministic raw audio: n frames of 640 samples of a two-tone signal, (1, n, 640) float32."""
    t = np.arange(n * AUDIO_FRAME) / 16000.0
    wave = 0.6 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * (660 + 10 * seed) * t)
    return wave.astype(np.float32).reshape(1, n, AUDIO_FRAME)


class Gemma4UnifiedAdapter:
    """One checkpoint, both sides loaded once and reused for every case."""

    def __init__(self, model_dir: Path, dtype: str = "float32", attn_implementation: str = "eager",
                 quantize: str | None = None, threads: int = 1):
        """``quantize="mxfp8"``: the candidate quantizes on load; the reference ``hf`` runs with the
        weights its own codec dequantizes (the kernel's target: tight), and ``hf_float`` is the
        unquantized model (the cost of quantization: reported). ``threads``: see ``HFRunner``."""
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        if ModelArgs.from_file(self.model_dir / "config.json").quantization:
            raise InputError(f"{self.model_dir}: an MLX-quantized checkpoint has no HF reference; run the "
                             "unquantized checkpoint with --quantize instead")
        self.quantize = quantize
        self.candidate_model = self.load_candidate()  # strict: bad checkpoints fail here
        self.args = self.candidate_model.args
        self.hf = HFRunner(self.model_dir, dtype, attn_implementation, threads)
        self.hf_float = None
        self.reference_weights: Capture = {}
        self.dequantized_modules: dict[str, str] = {}  # {HF module path: stage} of the reference's codec
        self.unmatched: list[str] = []
        quantized = [p for p, s in self.candidate_model.quant_status.items() if s == "quantized"]
        if quantized:
            from reference.mxfp8_torch import roundtrip

            self.hf_float = HFRunner(self.model_dir, dtype, attn_implementation, threads)
            # a candidate may quantize modules ours leaves alone (MLX's default predicate takes embeddings
            # too): the reference dequantizes the linears it has a stage for and keeps the rest in full
            # precision, so the stages they feed name the difference (``unmatched``), never a traceback
            modules = {hf_module(p): dequantized_name(p) for p in quantized
                       if dequantized_name(p) is not None and self.hf.is_linear(hf_module(p))}
            self.unmatched = sorted(p for p in quantized if hf_module(p) not in modules)
            self.reference_weights = self.hf.quantize_dequantize(modules, roundtrip)
            self.dequantized_modules = modules
        self.quantized = frozenset(self.reference_weights)

    def load_candidate(self):
        """The port's model of this checkpoint, loaded afresh (under whatever defect is planted now)."""
        return load_model(self.model_dir, self.dtype, self.quantize)

    @cached_property
    def oracle_weights(self) -> dict[str, np.ndarray]:
        """The vision weights of the NumPy oracle: the checkpoint's, but in a quantized run ``patch_dense``'s
        dequantized weight, which the reference runs with (the oracle is of the model the kernel computes)."""
        weights = numpy_oracle.load_vision_weights(self.model_dir)
        dequantized = self.reference_weights.get("vision.patch_dense.weight")
        if dequantized is not None:
            weights["patch_dense.weight"] = dequantized
        return weights

    def supports(self, scenario: Scenario) -> bool:
        return supports(self.args, scenario)

    def stages(self, scenario: Scenario) -> tuple[Stage, ...]:
        return stages_for(self.args.text, bool(scenario.images), scenario.has_audio, self.quantized)

    def inputs(self, scenario: Scenario, decoded: dict[Path, np.ndarray], settings
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(case inputs, the reference's preprocessing). The prompt is built from the reference's
        soft-token counts; both sides get the same ids and the same decoded images."""
        max_soft_tokens = settings.max_soft_tokens
        pre = preprocessed(self, scenario, decoded, max_soft_tokens,
                           lambda images: self.hf.preprocess(images, max_soft_tokens, self.model_dir)
                           ) if scenario.images else {}
        a = self.args
        if scenario.images and int(pre["image_position_ids"].max()) >= a.vision.mm_posemb_size:
            raise InputError(f"{', '.join(map(str, scenario.images))}: position id "
                             f"{int(pre['image_position_ids'].max())} is outside the position table "
                             f"(mm_posemb_size={a.vision.mm_posemb_size}); use a smaller --max-soft-tokens")
        input_ids = np.array([prompt_ids(scenario, a, pre.get("num_soft_tokens_per_image", []))], np.int64)
        audio = [int(n) for kind, n in scenario.parts if kind == "audio"]
        frames = audio_frames(audio[-1]) if audio else None
        # the reference types the tokens; the candidate types them itself (Model.__call__), so a typing
        # defect in the port shows up at its masks and scattered inputs
        inputs = {"input.input_ids": input_ids, "input.mm_token_type_ids": self.hf.token_types(input_ids)}
        if frames is not None:
            inputs["input.audio_frames"] = frames
        return inputs, pre

    def reference(self, scenario: Scenario, inputs: dict[str, np.ndarray], pre: dict[str, np.ndarray],
                  settings, decode_steps: int, unquantized: bool = False
                  ) -> tuple[Capture, list[np.ndarray], list[int], float, dict]:
        """HF's capture of the case. ``unquantized=True``: the unquantized model of a quantized run.
        The extras (for :meth:`viz`): the ``mask.*`` stages under the other policy, built by the same
        forward (``HFRunner.forward``)."""
        stages = self.stages(scenario)
        runner = self.hf_float if unquantized else self.hf
        feed = {"input_ids": inputs["input.input_ids"], "mm_token_type_ids": inputs["input.mm_token_type_ids"]}
        if scenario.images:
            feed["pixel_values"], feed["image_position_ids"] = pre["pixel_values"], pre["image_position_ids"]
        if "input.audio_frames" in inputs:
            feed["audio_frames"] = inputs["input.audio_frames"]
        other: Capture = {}
        cap, steps, tokens, consistency = runner.forward(feed, settings.mask_policy, hook_points(stages), decode_steps,
                                                         None if unquantized else other)
        if not unquantized:
            cap.update(self.reference_weights)
        if scenario.images:
            image_stages(cap, pre)
        return cap, steps, tokens, consistency, other_policy_masks(settings, other)

    def viz(self, ref: Capture, cand: Capture, extras: dict, inputs: Capture, settings, stage_names: list[str]
            ) -> dict:
        """The case's pictures in the HTML report (``parity.adapters.gemma4_unified.viz``)."""
        return viz.pictures(ref, cand, extras, inputs, settings, stage_names)

    def candidate(self, scenario: Scenario, inputs: dict[str, np.ndarray], decoded: dict[Path, np.ndarray],
                  settings, tokens: list[int], teacher: Capture | None = None
                  ) -> tuple[Capture, list[np.ndarray]]:
        """Prefill under the tap recorder (teacher-forced when ``teacher`` is given), then one decode
        step per reference token, with the candidate's own cache."""
        model = self.candidate_model
        recorder = Recorder(teacher, defer=True)
        cache = model.make_cache()
        with tapping(recorder):
            pixel_values = position_ids = None
            if scenario.images:
                pixel_values, position_ids = rimage.preprocess_batch(
                    [decoded[p] for p in scenario.images], settings.max_soft_tokens, *self.patch_geometry)
            logits = model(inputs["input.input_ids"], None, pixel_values,
                           position_ids, inputs.get("input.audio_frames"), settings.candidate_mask_policy, cache, 0)
            mx.eval(logits)
        return recorder.settled(), decode_steps(model, cache, inputs["input.input_ids"].shape[1], tokens)

    def quantizable(self, mode: str) -> list[str]:
        """The module paths ``mode`` quantizes in this checkpoint (``rmlx-parity debug precision``)."""
        model = load_model(self.model_dir, self.dtype, mode)
        return [p for p, s in model.quant_status.items() if s == "quantized"]

    def port_logits(self, cases: list[tuple[Scenario, dict[str, np.ndarray]]], decoded: dict[Path, np.ndarray],
                    settings, quantize: str | None, keep: frozenset[str] = frozenset()) -> list[np.ndarray]:
        """The port's prefill logits of each (scenario, inputs), its checkpoint loaded afresh once:
        unquantized (``quantize`` None) or quantized but for the modules in ``keep``."""
        model = load_model(self.model_dir, self.dtype, quantize, keep if quantize else ())
        out = []
        for scenario, inputs in cases:
            pixel_values = position_ids = None
            if scenario.images:
                pixel_values, position_ids = rimage.preprocess_batch(
                    [decoded[p] for p in scenario.images], settings.max_soft_tokens, *self.patch_geometry)
            out.append(to_numpy(model(inputs["input.input_ids"], None, pixel_values, position_ids,
                                      inputs.get("input.audio_frames"), settings.candidate_mask_policy,
                                      model.make_cache(), 0)))
        return out

    @property
    def patch_geometry(self) -> tuple[int, int]:
        """(patch size, pooling kernel) of the checkpoint's vision_config (16, 3 in Gemma 4)."""
        v = self.args.vision
        return (v.patch_size, v.pooling_kernel_size) if v is not None else (16, 3)

    @cached_property
    def hf64(self) -> HFRunner:
        """HF's model in float64, softmax included (``reference.torch_ops.eager_float64``): the decoder's oracle.
        In a quantized run, with the reference's dequantized weights (exact in float64)."""
        runner = HFRunner(self.model_dir, "float64", "eager_float64")
        runner.set_weights({path: self.reference_weights[stage] for path, stage in self.dequantized_modules.items()})
        return runner

    def oracle(self, scenario: Scenario, decoded: dict[Path, np.ndarray], settings) -> Capture:
        """Float64 values: the independent NumPy preprocessing and vision embedder, and for every other
        stage HF's own model run in float64 on the same inputs (an fp32 candidate; a quantized one's target
        is the dequantized model: the NumPy oracle takes the dequantized ``patch_dense``, HF's float64 model
        every dequantized weight)."""
        float64_run = settings.dtype == "float32"
        cap = self._hf64_capture(scenario, decoded, settings) if float64_run else {}
        cap.update(self._numpy_oracle(scenario, decoded, settings))
        return cap

    def _hf64_capture(self, scenario: Scenario, decoded: dict[Path, np.ndarray], settings) -> Capture:
        inputs, pre = self.inputs(scenario, decoded, settings)
        feed = {"input_ids": inputs["input.input_ids"], "mm_token_type_ids": inputs["input.mm_token_type_ids"]}
        if scenario.images:
            feed["pixel_values"] = pre["pixel_values"].astype(np.float64)
            feed["image_position_ids"] = pre["image_position_ids"]
        if "input.audio_frames" in inputs:
            feed["audio_frames"] = inputs["input.audio_frames"].astype(np.float64)
        points = {k: v for k, v in hook_points(self.stages(scenario)).items() if v[1] != "mask"}
        cap, *_ = self.hf64.forward(feed, settings.mask_policy, points, 0, consistency=False)
        if scenario.images:
            image_stages(cap, pre)
        return {k: v for k, v in cap.items() if np.issubdtype(v.dtype, np.floating)}

    def _numpy_oracle(self, scenario: Scenario, decoded: dict[Path, np.ndarray], settings) -> Capture:
        if not scenario.images:
            return {}
        parts = []
        max_soft_tokens = settings.max_soft_tokens
        for p in scenario.images:
            image = decoded[p]
            side = self.patch_geometry[0] * self.patch_geometry[1]
            th, tw = numpy_oracle.soft_token_grid(image.shape[0], image.shape[1], max_soft_tokens, side)
            resized = image if image.shape[:2] == (th, tw) else self.hf.resize(image, th, tw)
            parts.append(numpy_oracle.patches(resized, max_soft_tokens, side))
        pixel_values = np.concatenate([p[0] for p in parts])
        positions = np.concatenate([p[1] for p in parts])
        cap = numpy_oracle.vision_embedder(self.oracle_weights, pixel_values, positions, self.args.vision.rms_norm_eps)
        cap["image.pixel_values"], cap["image.position_ids"] = pixel_values, positions
        return cap
