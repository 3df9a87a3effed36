"""The harness core knows no model (DESIGN.md): no module of ``parity/`` outside ``parity/adapters/``
imports an adapter, a model module of the port or of the reference, or names a model family in its
code. Checked on the import graph (every ``import`` at any depth of the AST, relative ones resolved),
not on a grep that comments could fool; and at run time, importing the core loads no adapter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(p for p in (ROOT / "parity").rglob("*.py") if "adapters" not in p.relative_to(ROOT).parts)

# What the core may take from the port and the reference: shared plumbing, no model.
ALLOWED = {
    "rmlx": "the package init (the BLAS loader)",
    "rmlx.nn": "the shared layers' package init (a docstring), for ``from rmlx.nn import kernels``",
    "rmlx.errors": "the one error type for bad input",
    "rmlx.blas": "which BLAS computed the candidate, for the versions record",
    "rmlx.imagefile": "image decoding (Pillow, validated): shared by every family with images",
    "rmlx.files": "the validated safetensors header and shard-index reader (no MLX), shared plumbing",
    "rmlx.nn.kernels": "the kernels that replace MLX's own, observed and checked (parity/kernels.py)",
    "reference.fixtures": "`rmlx-parity fixtures` regenerates the committed fixtures",
    "reference.synthetic": "`rmlx-parity fixtures --shape` writes real-size synthetic checkpoints",
}
PACKAGE_INITS = ("rmlx", "rmlx.nn")  # allowed themselves, not what is under them
MODEL_WORDS = ("gemma", "siglip")


def imports(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports, at any depth; ``package``: the module's package (default: from its path)."""
    tree = ast.parse(path.read_text(), str(path))
    package = package or ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            out.add(node.args[0].value)
    return out


def code_strings(path: Path) -> list[str]:
    """Identifiers and string constants of a module, without its docstrings and comments."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.append(node.id)
        elif isinstance(node, ast.Attribute):
            out.append(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append(node.value)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            out.append(node.name)
    return out


@pytest.mark.parametrize("path", CORE, ids=[str(p.relative_to(ROOT)) for p in CORE])
def test_core_imports_no_model(path):
    bad = sorted(m for m in imports(path)
                 if m.startswith(("parity.adapters", "rmlx.models"))
                 or (m.split(".")[0] in ("rmlx", "reference") and m not in ALLOWED
                     and not any(m.startswith(a + ".") and a not in PACKAGE_INITS for a in ALLOWED)))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; the core may import only {sorted(ALLOWED)}"


@pytest.mark.parametrize("path", CORE, ids=[str(p.relative_to(ROOT)) for p in CORE])
def test_core_names_no_model(path):
    named = sorted({s for s in code_strings(path) if any(w in s.lower() for w in MODEL_WORDS)})
    assert not named, f"{path.relative_to(ROOT)} names a model family in its code: {named}"


def test_importing_the_core_loads_no_adapter():
    core = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in CORE]
    core = [m.removesuffix(".__init__") for m in core]
    code = (f"import sys, importlib\nfor m in {core!r}: importlib.import_module(m)\n"
            "print(','.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout.strip().split(",")
    leaked = [m for m in loaded if m.startswith(("parity.adapters", "rmlx.models"))]
    assert not leaked, leaked


def test_the_checker_sees_what_it_forbids(tmp_path):
    """The import walker sees nested, relative and dynamic imports (so the test above is not vacuous)."""
    src = tmp_path / "probe.py"
    src.write_text("def f():\n    from .adapters import gemma4_unified\n    import importlib\n"
                   "    importlib.import_module('rmlx.models.gemma4_unified.model')\n    return 'Gemma4Thing'\n")
    found = imports(src, "parity")
    assert {"parity.adapters", "parity.adapters.gemma4_unified", "rmlx.models.gemma4_unified.model"} <= found
    assert "Gemma4Thing" in code_strings(src)
