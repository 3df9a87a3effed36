"""What produced a record: package versions and the git commit of the code under test.

Nothing here imports a package that a core install (numpy, safetensors, ml_dtypes, Pillow) lacks:
a package that is not installed is recorded as ``None``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

_PACKAGES = {"transformers": "transformers", "torch": "torch", "mlx": "mlx", "numpy": "numpy",
             "safetensors": "safetensors", "pillow": "pillow", "rmlx": "rmlx"}


def package_version(dist: str) -> str | None:
    """An installed distribution's version (None: not installed), from its metadata: nothing imported."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """The versions of the reference, the port's runtime and the harness (``None``: not installed), the
    Python, the platform and the BLAS MLX calls."""
    from rmlx import blas as rmlx_blas

    out: dict[str, str | None] = {k: package_version(d) for k, d in _PACKAGES.items()}
    blas = rmlx_blas.in_use()
    out.update({"python": platform.python_version(), "platform": platform.platform(),
                "blas": "{blas} ({why})".format(**blas), "cpu": cpu()})
    if "sgemm_output" in blas:  # not a machine difference for the gate: the same bits (tests/test_blas.py)
        out["sgemm_output"] = blas["sgemm_output"]
    return out


# the widest vector extension first: MKL, oneDNN and torch's kernels each pick their code path by it, so two
# processors of one tier and model round alike and two of different tiers do not
_X86_TIERS = ("avx512f", "avx2", "avx", "sse4_2")
_ARM_TIERS = ("sve2", "sve", "asimd")


def cpu() -> str:
    """The processor the numbers come from: its model, the widest vector extension the kernels can use,
    and the cores this process may run on (a BLAS splits a product by them), e.g. ``AMD EPYC, family
    25 model 1; avx2; 2 cores``. Two runs of the same code differ in their last bits on two processors that differ here;
    the gate widens its allowance for a baseline recorded on another one (:mod:`parity.gate`)."""
    model, flags = platform.machine() or "unknown", set()
    if sys.platform.startswith("linux"):
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            text = ""
        first = text.split("\n\n", 1)[0]  # the first processor's block
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
        model = fields.get("model name") or fields.get("CPU part") or model
        if fields.get("cpu family") and fields.get("model"):  # a hypervisor may show only "AMD EPYC"
            model += f", family {fields['cpu family']} model {fields['model']}"
        flags = set((fields.get("flags") or fields.get("Features") or "").split())
    elif sys.platform == "darwin":
        try:
            p = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                               timeout=10)
            model = p.stdout.strip() or model
        except (OSError, subprocess.SubprocessError):
            pass
    tier = next((t for t in _X86_TIERS + _ARM_TIERS if t in flags), None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "; ".join(p for p in (" ".join(model.split()), tier, f"{cores} cores") if p)


def git(where: Path | None = None) -> dict[str, str | bool | None]:
    """The commit of the code under test: the git work tree holding the installed ``parity`` package
    (``commit`` None outside one). ``dirty`` is True when tracked files differ from that commit, so a
    record of uncommitted code is never mistaken for the commit's."""
    where = where or Path(__file__).resolve().parent

    def run(*cmd: str) -> str | None:
        try:
            p = subprocess.run(["git", "-C", str(where), *cmd], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "committed": None, "subject": None}
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status),
            "committed": run("show", "-s", "--format=%cI", "HEAD"), "subject": run("show", "-s", "--format=%s", "HEAD")}
