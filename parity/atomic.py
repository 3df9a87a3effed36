"""Atomic publishing: every file or folder rmlx writes appears whole or not at all.

A writer works in a temporary sibling (``.NAME.rmlx-PID-XXXX``) and renames it into place when it is
complete. A temporary sibling whose process no longer runs (killed mid-write) is swept away when the
next command starts (``rmlx-parity``'s startup sweeps every folder it will write into) and whenever
anything is published next to it.

A write that fails inside a staging folder is an ``OSError`` naming the destination path, not the
temporary one: the safetensors writer's own error (``SafetensorError: ... (os error 27)``, a full disk
or ``ulimit -f``) included.
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


def sweep(folder: Path, before: float | None = None) -> list[Path]:
    """Remove the temporary siblings in ``folder`` left by rmlx processes that no longer run (and, with
    ``before``, last modified before that time: older than the run that sweeps)."""
    gone = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return gone
    for p in entries:
        m = _STAGED.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        try:
            if before is not None and p.lstat().st_mtime >= before:
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        except OSError:  # not ours to remove after all (another user's folder): left alone
            continue
        gone.append(p)
    return gone


def _final_name(name: str | os.PathLike | None, staging: list[tuple[Path, Path]]) -> str | None:
    """A path inside a temporary sibling as the path it will be published at."""
    if name is None:
        return None
    path = Path(os.fsdecode(name))
    for tmp, final in staging:
        if path == tmp or tmp in path.parents:
            return str(final / path.relative_to(tmp))
    return str(path)


def _newest(staging: list[tuple[Path, Path]]) -> str | None:
    """The entry made last in the staging places: where a write that names no file failed. The
    safetensors writer leaves no partial file behind, so this is then the folder it was writing into
    (a folder wins a tie of time stamps: a file system's clock ticks in milliseconds)."""
    entries = []
    for tmp, _ in staging:
        entries += [tmp] if not tmp.is_dir() else list(tmp.rglob("*")) or [tmp]
    try:
        stamped = [((p.lstat().st_mtime_ns, p.is_dir(), len(p.parts)), p) for p in entries]
    except OSError:
        return None
    return str(max(stamped)[1]) if stamped else None


def _write_error(e: Exception, staging: list[tuple[Path, Path]]) -> OSError | None:
    """The ``OSError`` that ``e``, raised while writing into ``staging``, means (naming the destination);
    None when ``e`` is not a failed write."""
    if isinstance(e, OSError):
        code, text, name = e.errno, e.strerror or str(e), e.filename
    elif type(e).__name__ == "SafetensorError":  # safetensors' writer: "...: File too large (os error 27)"
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            return None
        code, name = int(m.group(1)), _newest(staging)
        text = os.strerror(code)
    else:
        return None
    return OSError(code, text, _final_name(name, staging))


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
        except OSError as e:  # a write has no file name: the file being written is the one
            raise OSError(e.errno, e.strerror or str(e), _final_name(e.filename or (staging[-1][0] if staging
                                                                                   else None), staging)) from e
        yield
        try:
            for tmp, path in staging:
                os.replace(tmp, path)
        except OSError as e:
            raise _write_error(e, staging) from e
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
    instead: a mount point cannot be replaced). Whatever happens, no temporary folder is left behind;
    a write that fails in the block is an ``OSError`` naming the destination (:func:`_write_error`)."""
    staging: list[tuple[Path, Path]] = []
    try:
        for final in map(Path, finals):
            final.parent.mkdir(parents=True, exist_ok=True)
            sweep(final.parent)
            tmp = Path(tempfile.mkdtemp(prefix=_prefix(final), dir=final.parent))
            tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700; the result is an ordinary folder
            staging.append((tmp, final))
        try:
            yield [tmp for tmp, _ in staging]
        except Exception as e:
            error = _write_error(e, staging)
            if error is None:
                raise
            raise error from e
        for _, final in staging:
            if before_rename is not None:
                before_rename(final)
        try:
            for tmp, final in staging:
                if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
                    # an empty folder given as the destination (a mount point cannot be replaced): fill it
                    for child in tmp.iterdir():
                        os.replace(child, final / child.name)
                    continue
                os.replace(tmp, final)
        except OSError as e:
            raise _write_error(e, staging) from e
    finally:
        for tmp, _ in staging:
            shutil.rmtree(tmp, ignore_errors=True)
