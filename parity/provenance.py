"""What produced a record: package versions and the git commit of the code under test.

Nothing here imports a package that a core install (numpy, safetensors, ml_dtypes, Pillow) lacks:
a package that is not installed is recorded as ``None``.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
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
    out.update({"python": platform.python_version(), "platform": platform.platform(),
                "blas": "{blas} ({why})".format(**rmlx_blas.in_use())})
    return out


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
