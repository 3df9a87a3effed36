"""Layer streaming (``rmlx-parity run --stream``): both sides one decoder layer at a time.

The reference is HF's own ``model(...)`` over a model whose layers live on disk
(``reference.gemma4_unified.stream.HFStreamRunner``). The candidate
(``rmlx.models.gemma4_unified.stream.StreamedModel``) runs in lockstep *inside* that forward, from hooks:

- when HF enters its language model (soft tokens merged, masks built): the candidate's
  ``Model.embed_inputs``; every stage before the first layer is compared;
- when HF is about to enter layer i + 1 (or its final norm, after the last layer), before HF reads
  that layer: the candidate's layer i; layer i's stages are compared and both sides' captures of
  them dropped. Nothing reads HF's next layer meanwhile: a read-ahead thread competes for the
  candidate's cores (docs/streaming.md, "Measured and not used");
- when HF's forward returns: the candidate's head (final norm, tied lm_head).

The core's case pipeline (``parity.pipeline.CaseRun``) compares what the hooks settle: layer i's
compares run on ``--threads`` workers while HF goes on with layer i + 1, and once both
sides have read layer i its bytes are dropped from the page cache (``posix_fadvise`` DONTNEED), so the
kernel never has to reclaim memory on the CPUs the forwards use.

Decode steps run the same way without captures. Teacher forcing works as in a resident run (the
candidate's tap returns the reference's value, which is always captured first). At any moment the
process holds the resident small modules, at most two decoder layers' tensors (HF's layer i goes
back to ``meta`` before the candidate reads its own, but HF keeps that memory to cast layer i + 1
into, until the last layer; the candidate's is dropped before HF reads layer i + 1), MLX's cache of
freed buffers (up to ``LAYER_CACHE``, cleared before the logits), at most two layers' captures (one
being compared), the logits, and -- with decode steps only -- both sides' KV caches (the prefill's
keys and values of every layer).

Not in a streamed run: HF's self-consistency forward (a second pass over the disk; recorded as
null), the float64 run of the decoder (a third model; the vision stages keep their NumPy oracle and
its noise floor), the other policy's masks in the HTML report and ``--quantize``'s cost. ``--dump`` writes
each stage as it is settled (``parity.dumps.Spool``), so a dump never holds more than the lockstep does.
"""

from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path

import rmlx  # noqa: F401  (before mlx: it loads the BLAS MLX calls, rmlx/blas.py)

# isort: split
import mlx.core as mx
import numpy as np

from parity.adapter import Scenario
from parity.adapters.gemma4_unified.adapter import Gemma4UnifiedAdapter, hf_module, image_stages
from parity.adapters.gemma4_unified.stages import MASK_KINDS
from parity.capture import Capture, Recorder, to_numpy
from parity.pipeline import CaseRun
from parity.stages import hook_points
from reference.gemma4_unified.stream import HFStreamRunner
from reference.torch_ops import bool_mask
from reference.torch_ops import to_numpy as torch_to_numpy
from rmlx.models.gemma4_unified import image as rimage
from rmlx.models.gemma4_unified.stream import StreamedModel
from rmlx.nn.quant import dequantized_name, dequantized_weights
from rmlx.tap import tapping

_KEEP = ("image.", "vision.", "mask.")  # small stages the float64 oracle and the HTML report's pictures read
_HEAD = ("text.norm", "logits")
LAYER_CACHE = 3 << 30  # bytes of freed MLX buffers kept for reuse while the decoder layers run


def peak_rss_gib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StreamAdapter(Gemma4UnifiedAdapter):
    """The adapter of a streamed checkpoint: same inputs, stages and oracle; both models streamed."""

    def __init__(self, model_dir: Path, dtype: str = "float32", attn_implementation: str = "eager",
                 quantize: str | None = None, threads: int = 1):
        self.model_dir, self.dtype = Path(model_dir), dtype
        self.quantize = quantize
        # strict name/shape check, no layer read; quantize-on-load of each layer as it is read
        self.streamed = StreamedModel(self.model_dir, dtype, quantize)
        self.candidate_model = self.streamed.model
        self.args = self.candidate_model.args
        self.hf = HFStreamRunner(self.model_dir, dtype, attn_implementation, threads)
        self.hf_float = None  # no unquantized reference streamed alongside: no quantization cost (docstring)
        self.reference_weights: Capture = {}
        self.unmatched: list[str] = []
        quantized = [p for p, s in self.streamed.quant_status.items() if s == "quantized"]
        if quantized:
            from reference.mxfp8_torch import roundtrip

            modules = {hf_module(p): dequantized_name(p) for p in quantized if dequantized_name(p) is not None}
            layered = {m: s for m, s in modules.items() if m.startswith("model.language_model.layers.")}
            resident = {m: s for m, s in modules.items() if m not in layered}
            # the resident modules are loaded: dequantized now; each layer's weights when they are read
            self.reference_weights = self.hf.quantize_dequantize(resident, roundtrip)
            self.hf.weights.quantize_on_read({f"{m}.weight": s for m, s in layered.items()}, roundtrip)
            self.quantized = frozenset(modules.values())
        else:
            self.quantized = frozenset()

    def _hf64_capture(self, scenario, decoded, settings) -> Capture:
        return {}  # no resident float64 model of a checkpoint streamed for its size (module docstring)


class _Setting:
    """``obj.name = value`` until ``remove()`` (a hook handle's interface) puts the old value back."""

    def __init__(self, obj, name: str, value):
        self.obj, self.name, self.old = obj, name, getattr(obj, name)
        setattr(obj, name, value)

    def remove(self) -> None:
        setattr(self.obj, self.name, self.old)


class Lockstep:
    """The hooks that run the candidate inside HF's streamed forward (see the module docstring)."""

    def __init__(self, adapter: StreamAdapter, run: CaseRun):
        self.adapter, self.run = adapter, run
        self.scenario, self.inputs, self.pre, self.decoded = run.scenario, run.inputs, run.pre, run.decoded
        self.settings, self.names = run.settings, run.names
        self.ref: Capture = {}
        self.recorder = Recorder(self.ref if self.settings.mode == "teacher" else None)
        self.model = adapter.candidate_model
        self.text = self.model.language_model
        # the KV cache only feeds decode steps (0.9 GiB at 1127 tokens of the 12B shapes: not held for none)
        self.cache = self.model.make_cache() if self.settings.decode_steps > 0 else None
        self.forward = -1  # 0: the prefill; k: decode step k
        self.cand_logits: np.ndarray | None = None
        self.step_logits: list[np.ndarray] = []
        self.seconds = {"candidate": 0.0}
        self.length = int(self.inputs["input.input_ids"].shape[1])

    # -- hooks ---------------------------------------------------------------------------------
    def install(self) -> list:
        hf = self.adapter.hf.model
        lm = hf.model.language_model
        handles = [hf.register_forward_pre_hook(self._enter, with_kwargs=True),
                   hf.register_forward_hook(self._leave),
                   lm.register_forward_pre_hook(self._prefix, with_kwargs=True)]
        for j in range(1, len(lm.layers)):
            handles.append(lm.layers[j].register_forward_pre_hook(self._layer_hook(j - 1), prepend=True))
        handles.append(lm.norm.register_forward_pre_hook(self._layer_hook(len(lm.layers) - 1), prepend=True))
        # HF reads each layer into the last one's tensors, and a quantized run's reference weights are
        # views of them (``Weights.before_reuse``): their compares finish before that
        if self.adapter.hf.weights.codec:
            handles.append(_Setting(self.adapter.hf.weights, "before_reuse", self.run.collect))
        return handles

    def _enter(self, module, args, kwargs) -> None:
        # MLX's CPU allocator keeps 32 MiB of freed buffers by default: every layer would fault in and
        # zero a fresh 1.3 GiB (bf16 read + fp32 weights). A cache of two layers' worth reuses them.
        self.cache_limit = mx.set_cache_limit(LAYER_CACHE)
        self.forward += 1
        self.h, self.masks, self.attended = None, None, {}
        self.token = None if self.forward == 0 else int(kwargs["input_ids"][0, -1])

    def _prefix(self, module, args, kwargs) -> None:
        t0 = time.perf_counter()
        if self.forward == 0:
            self._reference_prefix(kwargs)
            with tapping(self.recorder):
                self.h, self.masks = self.model.embed_inputs(
                    self.inputs["input.input_ids"], None, *self._pixels(), self.inputs.get("input.audio_frames"),
                    self.settings.candidate_mask_policy, self.cache, 0)
                mx.eval(self.h, self.masks)
        else:
            self.h, _ = self.model.embed_inputs(np.array([[self.token]]), cache=self.cache,
                                                offset=self.length + self.forward - 1)
        self.seconds["candidate"] += time.perf_counter() - t0
        if self.forward == 0:
            self.settle([n for n in self.names if not n.startswith("layers.") and n not in _HEAD])

    def _layer_hook(self, i: int):
        def pre(module, args) -> None:
            t0 = time.perf_counter()
            layer = self.adapter.streamed.layer(i)
            self.adapter.hf.weights.evict(f"model.language_model.layers.{i}.")  # both sides have read it
            offset = 0 if self.forward == 0 else self.length + self.forward - 1
            weights: dict = {}
            read = self.adapter.hf.weights.dequantized  # the reference's codec values (HF read this layer first)
            done = {k: read.pop(k) for k in [k for k in read if k.startswith(f"layers.{i}.")]}
            with tapping(self.recorder) if self.forward == 0 else contextlib.nullcontext():
                if self.forward == 0:
                    self.ref.update({k: v for k, v in done.items() if k in self.run.tols})
                    weights = dequantized_weights(layer, f"language_model.layers.{i}.")
                    mx.eval(list(weights.values()))  # together: they are spread over the CPU streams
                    for name, weight in weights.items():  # record-only, as Model.embed_inputs taps the
                        # resident ones; views of fresh arrays that nothing writes (0.9 GiB a layer at the
                        # 12B shapes: a copy would double it)
                        self.recorder.capture[name] = np.asarray(memoryview(weight))
                    # compared while the layer runs: HF's values are views of the tensors its next layer
                    # is read into (``Weights.before_reuse``), which waits for these compares
                    self.settle(list(weights))
                self.h = self.text.step(i, layer, self.h, self.masks, self.cache, offset, self.attended)
                mx.eval(self.h)
            del layer
            self.seconds["candidate"] += time.perf_counter() - t0
            if self.forward == 0:
                self.settle([n for n in self.names if n.startswith(f"layers.{i}.") and n not in weights])
            if i == self.text.cfg.num_hidden_layers - 1:  # the logits next: no layer buffers to keep
                mx.set_cache_limit(self.cache_limit)
                mx.clear_cache()
        return pre

    def _leave(self, module, args, output) -> None:
        t0 = time.perf_counter()
        with tapping(self.recorder) if self.forward == 0 else contextlib.nullcontext():
            logits = self.text.head(self.h)
            mx.eval(logits)
        if self.forward == 0:
            self.cand_logits = self.recorder.capture.pop("logits")
        else:
            self.step_logits.append(to_numpy(logits))
        del logits
        self.seconds["candidate"] += time.perf_counter() - t0
        if self.forward == 0:
            self.settle(["text.norm"])

    # -- the reference's values that are not module outputs -------------------------------------
    def _reference_prefix(self, kwargs) -> None:
        ref = self.ref
        if self.scenario.images:
            image_stages(ref, self.pre)
        ref["text.inputs_embeds"] = torch_to_numpy(kwargs["inputs_embeds"])
        ref.update({k: v for k, v in self.adapter.reference_weights.items() if k in self.names})
        masks = kwargs["attention_mask"]  # {layer type: mask}, as every layer of that type receives it
        for kind in MASK_KINDS:
            if f"mask.{kind}" in self.names:
                ref[f"mask.{kind}"] = torch_to_numpy(bool_mask(masks[kind], self.length))

    def _pixels(self) -> tuple:
        if not self.scenario.images:
            return None, None
        return rimage.preprocess_batch([self.decoded[p] for p in self.scenario.images],
                                       self.settings.max_soft_tokens, *self.adapter.patch_geometry)

    def take_logits(self) -> np.ndarray | None:
        """The candidate's prefill logits, no longer held here (the pipeline drops them when done)."""
        logits, self.cand_logits = self.cand_logits, None
        return logits

    def settle(self, names: list[str]) -> None:
        """Hand these stages of both sides to the pipeline, which compares them behind the forward and
        drops them (``CaseRun.settle``)."""
        self.run.settle(names, self.ref, self.recorder.capture)


def run_case_streamed(adapter: StreamAdapter, model: Path, scenario: Scenario, decoded: dict[Path, np.ndarray],
                      settings, keep_captures: bool = False):
    """One case, streamed: the core's case pipeline (``parity.pipeline.CaseRun``) fed layer by layer, so
    the same CaseResult as ``parity.runner.run_case`` (captures spooled for ``--dump``, not kept), plus
    ``stream``: layer reads, the process's peak RSS, and where the time went. ``*_forward_s`` is each
    model's own time, reading its weights included (``*_load_s`` of it); ``capture_s`` (copying stage
    values out), ``compare_s`` (metrics, oracle, viz) and ``setup_s`` (inputs, hooks) are the harness's."""
    run = CaseRun(adapter, model, scenario, decoded, settings, keep=lambda name: name.startswith(_KEEP),
                  spool=keep_captures, workers=settings.threads)
    inputs, pre = run.inputs, run.pre
    lock = Lockstep(adapter, run)
    # text.inputs_embeds and the masks are read when HF enters its language model (Lockstep._prefix)
    points = {k: v for k, v in hook_points(run.all_stages).items()
              if k != "text.inputs_embeds" and not k.startswith("mask.")}
    feed = {"input_ids": inputs["input.input_ids"], "mm_token_type_ids": inputs["input.mm_token_type_ids"]}
    if scenario.images:
        feed["pixel_values"], feed["image_position_ids"] = pre["pixel_values"], pre["image_position_ids"]
    if "input.audio_frames" in inputs:
        feed["audio_frames"] = inputs["input.audio_frames"]
    handles = lock.install()
    reads0, hf_load0, cand_load0 = adapter.hf.layer_reads, adapter.hf.load_seconds, adapter.streamed.load_seconds
    hf_capture0 = adapter.hf.capture_seconds
    t_forward = time.perf_counter()
    try:
        captured, ref_steps, tokens, _ = adapter.hf.forward(feed, settings.mask_policy, points, settings.decode_steps,
                                                            consistency=False, captured=lock.ref)
        run.collect()
    finally:
        for h in handles:
            h.remove()
        run.close()
    t_forward = time.perf_counter() - t_forward
    settled = run.seconds  # the compares on the forward's thread (the rest overlapped HF's next layer)
    t1 = time.perf_counter()
    result = run.finish((lock.take_logits(), captured.pop("logits")), ref_steps, lock.step_logits, tokens,
                        self_consistency=None)
    after = time.perf_counter() - t1
    capture = {"reference": adapter.hf.capture_seconds - hf_capture0, "candidate": lock.recorder.seconds}
    reference_s = t_forward - lock.seconds["candidate"] - settled - capture["reference"]
    result.stream = {"reference_forward_s": round(reference_s, 3),
                     "candidate_forward_s": round(lock.seconds["candidate"] - capture["candidate"], 3),
                     "capture_s": round(capture["reference"] + capture["candidate"], 3),
                     "reference_load_s": round(adapter.hf.load_seconds - hf_load0, 3),
                     "candidate_load_s": round(adapter.streamed.load_seconds - cand_load0, 3),
                     "compare_s": round(settled + after, 3),
                     "setup_s": round(result.seconds - t_forward - after, 3),
                     "layer_reads": adapter.hf.layer_reads - reads0, "peak_rss_gib": round(peak_rss_gib(), 3)}
    return result
