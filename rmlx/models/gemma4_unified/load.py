"""Loading a Gemma 4 unified checkpoint (``load_model``: plain, MLX-quantized, or quantized on load) and
writing its MLX-quantized copy (``save_quantized``), on the strict reader of ``rmlx.load``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from rmlx.errors import InputError
from rmlx.load import DTYPES, load_checkpoint
from rmlx.models.gemma4_unified.config import ModelArgs
from rmlx.models.gemma4_unified.model import Model, checkpoint_key, module_path
from rmlx.nn import quant


def load_model(path: str | Path, dtype: str = "float32", quantize: str | None = None,
               keep: Iterable[str] = ()) -> Model:
    """Load a gemma4_unified checkpoint directory into an MLX ``Model`` in ``dtype``.

    An MLX-style quantized checkpoint (``config.json`` "quantization") loads as quantized linears;
    ``quantize="mxfp8"`` quantizes an unquantized checkpoint on load, but for the modules named in
    ``keep`` (module paths, e.g. ``language_model.layers.0.mlp.down_proj``: ``rmlx-parity debug
    precision`` chooses them). ``model.quant_status`` says, per quantizable module, whether it was
    quantized or why not.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: checkpoint directory not found")
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    args = ModelArgs.from_file(path / "config.json")
    model = Model(args)
    model.quant_status = {}
    if args.quantization:
        if quantize is not None:
            raise InputError(f"{path}: the checkpoint is already quantized; drop --quantize")
        model.quant_status = _quantize_as_stored(model, args.quantization, path)
    load_checkpoint(model, path, dtype, checkpoint_key)
    keep = set(keep)
    if keep and quantize is None:
        raise InputError("modules to keep in full precision were given without a quantization mode")
    if quantize is not None:
        model.quant_status = quant.quantize(model, quantize, {p: False for p in keep})
        unknown = sorted(keep - model.quant_status.keys())
        if unknown:
            raise InputError(f"{path}: no quantizable module {unknown[0]!r} to keep in full precision "
                             f"({len(unknown)} unknown; the quantizable ones: {sorted(model.quant_status)[:3]} ...)")
    mx.eval(model.parameters())
    return model




def save_quantized(src: str | Path, dst: str | Path, mode: str, keep: Iterable[str] = ()) -> dict[str, str]:
    """``rmlx-parity convert``: write an MLX-style quantized copy of checkpoint ``src`` into the folder
    ``dst`` (created if missing; it must be empty). ``rmlx-parity convert`` writes into a temporary
    folder and renames it into place (``parity.atomic``).

    Tensors keep the on-disk HF key spelling (``<module>.weight`` uint32 words + ``<module>.scales``);
    ``config.json`` gains "quantization" with ``False`` for every module left unquantized (``keep``:
    modules left in full precision on purpose, as ``rmlx-parity debug precision`` writes them).
    """
    import shutil

    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise InputError(f"{dst}: already exists and is not empty; choose a new folder")
    model = load_model(src, "float32", quantize=mode, keep=keep)
    config = json.loads((src / "config.json").read_text())
    skipped = {checkpoint_key(p + ".weight")[: -len(".weight")]: False
               for p, s in model.quant_status.items() if s != "quantized"}
    config["quantization"] = {**quant.MODES[mode], "mode": mode, **skipped}
    dst.mkdir(parents=True, exist_ok=True)
    weights = {checkpoint_key(k): v for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", dst / "generation_config.json")
    return model.quant_status


def _quantize_as_stored(model: Model, q: dict, path: Path) -> dict[str, str]:
    mode = q.get("mode", "affine")
    if mode not in quant.MODES:
        raise InputError(f"{path / 'config.json'}: quantization mode {mode!r} is not supported")
    for key in ("group_size", "bits"):
        if q.get(key) != quant.MODES[mode][key]:
            raise InputError(f"{path / 'config.json'}: quantization {key}={q.get(key)!r}, {mode} needs "
                             f"{quant.MODES[mode][key]}")
    overrides = {module_path(k): v for k, v in q.items() if k not in ("group_size", "bits", "mode")}
    return quant.quantize(model, mode, overrides)
