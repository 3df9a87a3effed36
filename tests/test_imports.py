"""The import direction of DESIGN.md: rmlx never imports torch; reference never imports mlx;
parity.metrics imports neither. Each package is imported in a fresh interpreter."""

import subprocess
import sys

import pytest

CASES = [
    ("rmlx, rmlx.load, rmlx.models.gemma4_unified.image, rmlx.models.gemma4_unified.vision, "
     "rmlx.models.gemma4_unified.model, rmlx.tap, rmlx.nn.quant, rmlx.nn.text, rmlx.models.gemma4_unified.stream, "
     "rmlx.models.gemma4.model",
     ["torch", "transformers", "parity", "reference"]),
    ("reference, reference.torch_ops, reference.gemma4_unified.hf, reference.gemma4_unified.numpy_oracle, "
     "reference.fixtures, reference.mxfp8, reference.synthetic, reference.gemma4_unified.stream, reference.gemma4.hf",
     ["mlx", "rmlx", "parity"]),
    # parity's package init imports rmlx's (the BLAS loader, rmlx/blas.py: ctypes, no mlx) and nothing else of rmlx
    ("parity.metrics", ["mlx", "torch", "transformers", "reference", "rmlx.models", "rmlx.load", "rmlx.nn"]),
    # the core install's commands (compare, gate --record, report, history) and the families' stage
    # vocabulary they order and classify stages with: no MLX, torch or transformers
    ("parity.compare, parity.gate, parity.report, parity.report.html, parity.report.junit, parity.history, "
     "parity.cli, parity.pytest_plugin, parity.tolerances, parity.adapters.gemma4_unified, parity.adapters.gemma4",
     ["mlx", "torch", "torchvision", "transformers"]),
]


@pytest.mark.parametrize("modules,forbidden", CASES, ids=[c[0].split(",")[0] for c in CASES])
def test_import_direction(modules, forbidden):
    code = (f"import sys, importlib\nfor m in {modules.split(', ')!r}: importlib.import_module(m)\n"
            "print(','.join(sorted(k for k in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(out.strip().split(","))
    leaked = [f for f in forbidden if f in loaded]
    assert not leaked, f"importing {modules} pulled in {leaked}"
    if modules == "parity.metrics":  # of rmlx, only the package init: the error type and the BLAS loader
        assert {m for m in loaded if m.split(".")[0] == "rmlx"} <= {"rmlx", "rmlx.blas", "rmlx.errors"}
