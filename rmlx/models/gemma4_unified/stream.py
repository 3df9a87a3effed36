"""Layer streaming: a checkpoint too big for memory, run one decoder layer at a time.

``StreamedModel`` checks the whole checkpoint strictly (every name and shape, from the safetensors
headers, without reading data), keeps the small modules (vision / audio embedders, final norm)
resident, and materialises decoder layer ``i`` only when asked (``layer(i)``), from MLX's lazy
``mx.load``; the caller drops it after use. The tied vocabulary table (262144 x 3840 at the 12B
shapes: 4 GiB in fp32) is never materialised: ``RowsEmbedding`` reads the rows a prompt uses and
computes the tied lm_head over row chunks, straight from the memory-mapped file.

Resident at any time: the small modules, one decoder layer, the activations, one vocabulary chunk
and the logits (L x V). The model's forward code is the same as the resident model's
(``Model.embed_inputs``, ``TextModel.step``, ``TextModel.head``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from rmlx.errors import InputError
from rmlx.files import checkpoint_files, safetensors_layout
from rmlx.load import DTYPES, check_weights
from rmlx.models.gemma4_unified.config import ModelArgs
from rmlx.models.gemma4_unified.model import Model, checkpoint_key
from rmlx.nn import quant
from rmlx.nn.base import cpu_streams
from rmlx.nn.kernels import matmul_t
from rmlx.nn.text import DecoderLayer

EMBED = "language_model.embed_tokens.weight"
VOCAB_CHUNK = 16384  # rows of the vocabulary table per lm_head chunk (240 MiB in fp32 at hidden 3840)


class _Meta:
    """A tensor's shape without its data (for the strict name/shape check)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


class TensorFile:
    """Where one tensor lives: (file, dtype, shape, data offset); reads row ranges of it."""

    _NP = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}

    def __init__(self, path: Path, data_start: int, info: dict):
        self.path = path
        self.dtype = info["dtype"]
        self.shape = tuple(info["shape"])
        self.offset = data_start + info["data_offsets"][0]
        if self.dtype not in self._NP:
            raise InputError(f"{path}: tensor dtype {self.dtype} cannot be streamed (F32, BF16 or F16)")

    def rows(self, start: int, stop: int, dtype: mx.Dtype) -> mx.array:
        """Rows [start, stop) as an mx.array in ``dtype``: one read() of exactly those bytes."""
        width = math.prod(self.shape[1:])
        np_dtype = self._NP[self.dtype]
        data = np.fromfile(self.path, dtype=np_dtype, count=(stop - start) * width,
                           offset=self.offset + start * width * np.dtype(np_dtype).itemsize)
        x = mx.array(data.reshape(stop - start, *self.shape[1:]))
        if self.dtype == "BF16":
            x = x.view(mx.bfloat16)
        return x.astype(dtype)


class RowsEmbedding(nn.Module):
    """The tied embedding of a streamed model: rows read on demand, lm_head over row chunks.

    ``__call__(ids)`` = ``nn.Embedding`` on the rows the ids name; ``as_linear(h, post)`` =
    ``post(h @ W.T)`` computed chunk by chunk of ``VOCAB_CHUNK`` rows, ``post`` (the soft-cap) on each
    chunk: on the whole 12B logits (1.2 GiB) it would add its temporaries and the join of its halves."""

    def __init__(self, tensor: TensorFile, dtype: mx.Dtype, chunk: int = VOCAB_CHUNK):
        super().__init__()
        self._tensor, self._dtype, self._chunk = tensor, dtype, chunk

    def __call__(self, ids: mx.array) -> mx.array:
        flat = np.asarray(ids).reshape(-1)
        uniq, local = np.unique(flat, return_inverse=True)
        table = mx.concatenate([self._tensor.rows(int(i), int(i) + 1, self._dtype) for i in uniq])
        return table[mx.array(local.reshape(np.asarray(ids).shape))]

    def as_linear(self, h: mx.array, post=None) -> mx.array:
        vocab = self._tensor.shape[0]
        parts = []
        for start in range(0, vocab, self._chunk):
            w = self._tensor.rows(start, min(start + self._chunk, vocab), self._dtype)
            part = matmul_t(h, w) if post is None else post(matmul_t(h, w))
            mx.eval(part)
            parts.append(part)
        return mx.concatenate(parts, axis=-1)


class StreamedModel:
    """A checkpoint directory opened for layer streaming (see the module docstring)."""

    def __init__(self, path: str | Path, dtype: str = "float32", quantize: str | None = None):
        """``quantize="mxfp8"``: quantize on load as ``load_model`` does, the resident modules now and
        each decoder layer when it is read (``quant_status`` lists every module once its plan is known:
        from the checkpoint's shapes, before any layer is read)."""
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"{path}: checkpoint directory not found")
        if dtype not in DTYPES:
            raise InputError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
        self.path, self.dtype = path, DTYPES[dtype]
        self.args = args = ModelArgs.from_file(path / "config.json")
        if args.quantization:
            raise InputError(f"{path}: --stream runs unquantized checkpoints (this one is MLX-quantized; stream "
                             "the unquantized one with --quantize)")
        self.model = Model(args)  # parameters stay lazy (never evaluated): nothing is allocated
        self.files: dict[str, Path] = {}  # module path -> file
        self.tensors: dict[str, TensorFile] = {}
        shapes: dict[str, _Meta] = {}
        for f in checkpoint_files(path):
            data_start, header = safetensors_layout(f)
            for key, info in header.items():
                if key != "__metadata__":
                    shapes[key] = _Meta(info["shape"])
                    self.tensors[key] = TensorFile(f, data_start, info)
        renamed, source = self.model.sanitize(shapes)
        # strict: every name and shape, before any data is read
        check_weights(self.model, renamed, source, checkpoint_key)
        self.source = source  # module path -> checkpoint key
        text = self.model.language_model
        text.layers = []  # decoder layers exist only while ``layer(i)`` is in use
        text.embed_tokens = RowsEmbedding(self.tensors[source[EMBED]], self.dtype)
        resident = [k for k in source if not k.startswith(("language_model.layers.", EMBED))]
        self.model.load_weights(list(self._read(resident).items()), strict=False)
        self.quantize_mode = quantize
        self.quant_status: dict[str, str] = {}
        if quantize is not None:
            if quantize not in quant.MODES:
                raise InputError(f"quantization mode {quantize!r} is not supported; choose one of "
                                 f"{sorted(quant.MODES)}")
            group = quant.MODES[quantize]["group_size"]
            for key in self.source:  # the plan of every decoder layer, from the shapes alone
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and key.startswith("language_model.layers.") and quant.quantizable(module):
                    k = self.tensors[self.source[key]].shape[1]
                    self.quant_status[module] = ("quantized" if k % group == 0 else
                                                 f"left unquantized: input size {k} is not a multiple of {group}")
            self.quant_status.update(quant.quantize(self.model, quantize))  # the resident modules
        mx.eval(self.model.parameters())
        self.load_seconds = 0.0  # spent in layer(i), reading and casting weights

    def _read(self, names: list[str]) -> dict[str, mx.array]:
        """Module paths -> arrays in the model dtype, read with MLX's lazy loader (only these tensors; on
        the CPU the casts alternate between two streams)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[self.source[name]].path, []).append(name)
        streams = cpu_streams() if mx.default_device() == mx.cpu else (mx.default_stream(mx.default_device()),)
        out = {}
        for f, group in by_file.items():
            lazy = mx.load(str(f))
            for name in group:
                v = lazy[self.source[name]]
                with mx.stream(streams[len(out) % len(streams)]):
                    out[name] = v.astype(self.dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            mx.eval(list(out.values()))
            del lazy
        return out

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer ``i`` with its weights read now (drop it to free them)."""
        t0 = time.perf_counter()
        cfg = self.args.text
        layer = DecoderLayer(cfg, i)
        prefix = f"language_model.layers.{i}."
        names = [k for k in self.source if k.startswith(prefix)]
        weights = {k[len(prefix):]: v for k, v in self._read(names).items()}
        layer.load_weights(list(weights.items()), strict=True)
        if self.quantize_mode is not None:
            quant.quantize(layer, self.quantize_mode, prefix=prefix)
        mx.eval(layer.parameters())
        self.load_seconds += time.perf_counter() - t0
        return layer

    def layer_bytes(self, i: int) -> int:
        """Bytes of decoder layer ``i`` in the model dtype (for the memory bound)."""
        prefix = f"language_model.layers.{i}."
        return sum(math.prod(self.tensors[self.source[k]].shape) for k in self.source
                   if k.startswith(prefix)) * self.dtype.size

    def resident_bytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
