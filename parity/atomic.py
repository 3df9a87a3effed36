"""Atomic publishing: every file or folder rmlx writes appears whole or not at all.

A writer works in a temporary sibling (``.NAME.rmlx-PID-XXXX``) and renames it into place when it is
complete. A temporary sibling whose process no longer runs (killed mid-write) is swept away the next
time anything is published next to it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK: int | None = None
_STAGED = re.compile(r"^\..+\.rmlx-(\d+)-[^.]+$")


def umask() -> int:
    """The process umask (read once; os.umask can only be read by setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return _UMASK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def sweep(folder: Path) -> list[Path]:
    """Remove the temporary siblings in ``folder`` left by rmlx processes that no longer run."""
    gone = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return gone
    for p in entries:
        m = _STAGED.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _prefix(final: Path) -> str:
    return f".{final.name}.rmlx-{os.getpid()}-"


def write_text(path: Path, text: str | bytes) -> None:
    """Write ``path`` atomically (a temporary sibling, then a rename), with ordinary permissions."""
    with staged_files({Path(path): text}):
        pass


@contextmanager
def staged_files(texts: dict[Path, str | bytes]) -> Iterator[None]:
    """Write each file's text to a temporary sibling now; when the block ends without an error, rename
    them all into place (after whatever the block published). On an error none is left behind."""
    staging: list[tuple[Path, Path]] = []
    try:
        for path, text in texts.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            sweep(path.parent)
            fd, tmp = tempfile.mkstemp(prefix=_prefix(path), dir=path.parent)
            staging.append((Path(tmp), path))
            os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; ours is an ordinary file
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-8", "backslashreplace") if isinstance(text, str) else text)
        yield
        for tmp, path in staging:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staging:
            tmp.unlink(missing_ok=True)


@contextmanager
def scratch(folder: Path, name: str = "scratch") -> Iterator[Path]:
    """A temporary folder inside ``folder`` (swept if its process dies), removed when the block ends."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sweep(folder)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(folder / name), dir=folder))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged(*finals: Path, before_rename: Callable[[Path], None] | None = None) -> Iterator[list[Path]]:
    """Yield one temporary sibling folder per destination in ``finals``. When the block ends without
    an error, ``before_rename`` checks every destination (all of them before the first rename) and
    each temporary folder is renamed into place (an existing empty destination folder is filled
    instead: a mount point cannot be replaced). Whatever happens, no temporary folder is left behind."""
    staging: list[tuple[Path, Path]] = []
    try:
        for final in map(Path, finals):
            final.parent.mkdir(parents=True, exist_ok=True)
            sweep(final.parent)
            tmp = Path(tempfile.mkdtemp(prefix=_prefix(final), dir=final.parent))
            tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700; the result is an ordinary folder
            staging.append((tmp, final))
        yield [tmp for tmp, _ in staging]
        for _, final in staging:
            if before_rename is not None:
                before_rename(final)
        for tmp, final in staging:
            if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
                # an empty folder given as the destination (a mount point cannot be replaced): fill it
                for child in tmp.iterdir():
                    os.replace(child, final / child.name)
                continue
            os.replace(tmp, final)
    finally:
        for tmp, _ in staging:
            shutil.rmtree(tmp, ignore_errors=True)
