"""The HF reference with its decoder layers streamed from disk (``rmlx-parity run --stream``).

``HFStreamRunner`` is an ``HFRunner`` whose model is HF's own ``Gemma4UnifiedForConditionalGeneration``
built on the ``meta`` device (no memory), so ``forward``, the hooks, the masks, RoPE, KV sharing and
the cache are all HF's code, run by HF's own ``model(...)``. What differs is where the weights are:

- the small modules (vision / audio embedders, final norm) are read once and stay resident;
- decoder layer ``i`` is read when HF calls it (a forward pre-hook: the stored tensors, viewed in a
  copy-on-write memory map of the file, cast to the run dtype as ``from_pretrained`` casts) and sent
  back to ``meta`` when it returns (a forward hook), so one layer is in use at a time. Its tensors'
  memory is kept and the next layer is cast into it where shapes match (no fresh pages to fault in
  and zero: 0.9 GiB per layer at the 12B shapes); once the candidate has read the layer too, its
  bytes are dropped from the page cache (``Weights.evict``);
- the tied vocabulary table is never materialised: ``embed_tokens`` is HF's own
  ``Gemma4UnifiedTextScaledWordEmbedding`` over the rows the prompt uses, and ``lm_head`` is
  ``F.linear`` over chunks of rows (the same op as the ``nn.Linear`` it replaces).

Checkpoint names are mapped to module names with transformers' own conversion table for
gemma4_unified (``vision_embedder.* -> embed_vision.*``), as ``from_pretrained`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from reference.gemma4_unified.hf import HFRunner
from reference.torch_ops import DTYPES

VOCAB_CHUNK = 16384
_MAPPED = {"BF16": (np.uint16, torch.bfloat16), "F16": (np.float16, torch.float16), "F32": (np.float32, torch.float32)}


def _shards(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (validated strictly by the rmlx side beforehand)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [model_dir / "model.safetensors"]


def _header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data, the safetensors header)."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """What ``from_pretrained`` does while it builds a model: the run dtype as torch's default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class Weights:
    """Checkpoint tensors by HF module name, read on demand through safetensors' ``safe_open``."""

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        renames = [(src, dst) for r in get_checkpoint_conversion_mapping("gemma4_unified") or []
                   for src, dst in zip(r.source_patterns, r.target_patterns, strict=True)]
        self.dtype = dtype
        self.where: dict[str, tuple[Path, str]] = {}  # HF name -> (file, checkpoint key)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.spans: dict[str, tuple[int, int]] = {}  # HF name -> (byte offset in its file, length)
        self.stored: dict[str, str] = {}  # HF name -> safetensors dtype
        for f in _shards(model_dir):
            data_start, header = _header(f)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                name = key
                for src, dst in renames:
                    name = re.sub(src, dst, name)
                self.where[name] = (f, key)
                self.shapes[name] = tuple(info["shape"])
                self.stored[name] = info["dtype"]
                start, end = info["data_offsets"]
                self.spans[name] = (data_start + start, end - start)
        # a quantized run's codec (``quantize_on_read``): {HF weight name: stage name}, applied to each
        # of these weights every time it is read; its dequantized values wait in ``dequantized``
        self.codec: dict[str, str] = {}
        self.roundtrip = None
        self.dequantized: dict[str, np.ndarray] = {}
        # set by whoever holds the dequantized values after they leave ``dequantized``: called before a
        # read casts into tensors again, so that it is done with them first. While it is set, a float32
        # weight's round trip runs in place and its value is a view of the weight (no fresh pages)
        self.before_reuse: Callable[[], None] | None = None

    def quantize_on_read(self, weights: dict[str, str], roundtrip) -> None:
        """Give each weight in ``weights`` = {HF weight name: stage name} the value ``roundtrip(w)``
        whenever it is read (the reference's own MX codec, as ``HFRunner.quantize_dequantize`` does to a
        resident model), and keep that value under its stage name in ``dequantized`` for the caller."""
        self.codec, self.roundtrip = dict(weights), roundtrip

    def _apply_codec(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` <- roundtrip(t), its float32 value kept under the weight's stage name: a view of ``t``
        itself for float32 while ``before_reuse`` is set, else a copy."""
        if t.dtype == torch.float32 and self.before_reuse is not None:
            self.dequantized[self.codec[name]] = self.roundtrip(t, out=t).numpy()
            return t
        out = self.roundtrip(t)
        t.copy_(out)
        self.dequantized[self.codec[name]] = out.numpy() if t.dtype == torch.float32 else t.detach().float().numpy()
        return t

    def _spans(self, prefix: str) -> Iterator[tuple[int, int, int]]:
        """(open file descriptor, byte offset, length) of every tensor under ``prefix``, each file
        opened once (closed when the iteration ends)."""
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for name, (f, _) in self.where.items():
            if name.startswith(prefix):
                by_file.setdefault(f, []).append(self.spans[name])
        for f, spans in by_file.items():
            fd = os.open(f, os.O_RDONLY)
            try:
                for offset, length in spans:
                    yield fd, offset, length
            finally:
                os.close(fd)

    def evict(self, prefix: str) -> None:
        """Tell the kernel the bytes of every tensor under ``prefix`` are no longer needed
        (``posix_fadvise`` DONTNEED): a streamed run reads each layer once, and page cache it leaves
        behind would have to be reclaimed later (kswapd, on the CPUs the forwards use)."""
        if not hasattr(os, "posix_fadvise"):
            return
        for fd, offset, length in self._spans(prefix):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)

    def read(self, names: list[str], into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Whole tensors, cast to the run dtype. ``into``: tensors of the run dtype, by name, to cast into
        (when the shape matches) instead of new ones: a streamed layer reuses the memory of the previous
        layer, so no fresh pages are faulted in and zeroed. Those are read from a copy-on-write memory
        map of the file (no intermediate copy); the others through safetensors' ``safe_open``."""
        out = {}
        if into and self.before_reuse is not None:
            self.before_reuse()
        for name in names:
            if name not in self.where:
                raise ValueError(f"checkpoint has no tensor for '{name}'")
            target = (into or {}).get(name)
            if target is not None and tuple(target.shape) == self.shapes[name] and self.stored[name] in _MAPPED:
                out[name] = target.copy_(self._mapped(name))  # the same cast as .to(dtype)
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in out:
                by_file.setdefault(self.where[name][0], []).append(name)
        for f, group in by_file.items():
            with safe_open(f, framework="pt") as h:
                for name in group:
                    out[name] = h.get_tensor(self.where[name][1]).to(self.dtype)
        for name in names:
            if name in self.codec:
                out[name] = self._apply_codec(name, out[name])
        return out

    def _mapped(self, name: str) -> torch.Tensor:
        """The stored tensor as a view of the file's pages (copy-on-write: never written back)."""
        np_dtype, torch_dtype = _MAPPED[self.stored[name]]
        offset, length = self.spans[name]
        data = np.memmap(self.where[name][0], dtype=np_dtype, mode="c", offset=offset,
                         shape=(length // np.dtype(np_dtype).itemsize,))
        return torch.from_numpy(data).view(torch_dtype).reshape(self.shapes[name])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        f, key = self.where[name]
        with safe_open(f, framework="pt") as h:
            return h.get_slice(key)[start:stop].to(self.dtype)


def load_module(module: nn.Module, prefix: str, weights: Weights, reuse: dict[str, torch.Tensor] | None = None
                ) -> None:
    """Give a ``meta`` module its checkpoint tensors (strict: every persistent tensor, nothing else).
    ``reuse``: tensors by name within the module (a released layer's) to read into when shapes match;
    it is updated with this module's tensors."""
    names = list(module.state_dict())
    into = None if reuse is None else {prefix + n: reuse[n] for n in names if n in reuse}
    got = weights.read([prefix + n for n in names], into)
    if reuse is not None:
        reuse.update({n: got[prefix + n] for n in names})
    for n in names:
        want = tuple(module.state_dict()[n].shape)
        if tuple(got[prefix + n].shape) != want:
            raise ValueError(f"tensor '{weights.where[prefix + n][1]}' has shape {tuple(got[prefix + n].shape)}, "
                             f"the config implies {want}")
    module.load_state_dict({n: got[prefix + n] for n in names}, strict=True, assign=True)


def _rows_embedding_class():
    from transformers.models.gemma4_unified.modeling_gemma4_unified import Gemma4UnifiedTextScaledWordEmbedding

    class RowsEmbedding(Gemma4UnifiedTextScaledWordEmbedding):
        """HF's scaled embedding over only the rows the ids name (read on each call)."""

        def __init__(self, weights: Weights, name: str, hidden: int, embed_scale: float):
            super().__init__(1, hidden, None, embed_scale=embed_scale)
            self._weights, self._name = weights, name

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            uniq, local = torch.unique(input_ids, return_inverse=True)
            rows = [self._weights.rows(self._name, int(i), int(i) + 1) for i in uniq]
            self.weight = nn.Parameter(torch.cat(rows), requires_grad=False)
            return super().forward(local)

    return RowsEmbedding


class ChunkedLinear(nn.Module):
    """``F.linear(h, W)`` with W's rows read in chunks (W: (V, H) on disk, never resident)."""

    def __init__(self, weights: Weights, name: str, chunk: int = VOCAB_CHUNK):
        super().__init__()
        self._weights, self._name, self._chunk = weights, name, chunk

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        vocab = self._weights.shapes[self._name][0]
        out = torch.empty((*h.shape[:-1], vocab), dtype=h.dtype)
        for start in range(0, vocab, self._chunk):
            stop = min(start + self._chunk, vocab)
            out[..., start:stop] = F.linear(h, self._weights.rows(self._name, start, stop))
        return out


def _release(module: nn.Module, args, output) -> None:
    module.to_empty(device="meta")  # frees the layer's tensors; returns None: the output stays


class HFStreamRunner(HFRunner):
    """``HFRunner`` over a checkpoint streamed layer by layer (see the module docstring)."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", attn_implementation: str = "eager",
                 threads: int = 1):
        from transformers import AutoConfig, Gemma4UnifiedForConditionalGeneration
        from transformers.models.gemma4_unified.modeling_gemma4_unified import Gemma4UnifiedTextRotaryEmbedding

        torch.set_num_threads(threads)
        self.model_dir, self.dtype = Path(model_dir), dtype
        config = AutoConfig.from_pretrained(self.model_dir, attn_implementation=attn_implementation,
                                            local_files_only=True)
        torch_dtype = DTYPES[dtype]
        self.weights = Weights(self.model_dir, torch_dtype)
        with default_dtype(torch_dtype):
            with torch.device("meta"):
                model = Gemma4UnifiedForConditionalGeneration(config).eval()
            text = model.model.language_model
            text.rotary_emb = Gemma4UnifiedTextRotaryEmbedding(config=config.get_text_config())  # non-persistent
            embed = "model.language_model.embed_tokens.weight"
            hidden = config.get_text_config().hidden_size
            text.embed_tokens = _rows_embedding_class()(self.weights, embed, hidden, hidden**0.5)
        # untied (tie_word_embeddings false): the checkpoint's own lm_head.weight, read the same way
        model.lm_head = ChunkedLinear(self.weights, embed if config.tie_word_embeddings else "lm_head.weight")
        for path, module in model.model.named_children():
            if path == "language_model":
                load_module(module.norm, "model.language_model.norm.", self.weights)
            elif module is not None:
                load_module(module, f"model.{path}.", self.weights)
        self._buffers: dict[str, torch.Tensor] = {}  # the last decoder layer's tensors, reused by the next
        for i, layer in enumerate(text.layers):
            layer.register_forward_pre_hook(self._materialize(f"model.language_model.layers.{i}."))
            layer.register_forward_hook(_release)
        text.layers[-1].register_forward_hook(self._drop_buffers)
        self.model, self.config = model, model.config
        self.layer_reads = 0
        self.capture_seconds = 0.0
        self.load_seconds = 0.0  # spent reading and casting decoder layers

    def _drop_buffers(self, module, args, output) -> None:
        """After the last decoder layer: free the tensors kept to read the next layer into (0.9 GiB in
        fp32 at the 12B shapes), until the next forward reads one afresh."""
        self._buffers.clear()

    def _materialize(self, prefix: str):
        def pre(module, args):
            t0 = time.perf_counter()
            load_module(module, prefix, self.weights, self._buffers)
            self.layer_reads += 1
            self.load_seconds += time.perf_counter() - t0
        return pre
