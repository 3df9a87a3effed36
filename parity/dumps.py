"""A safetensors dump written one tensor at a time: the streamed driver's ``--dump``.

``run --dump`` of a resident run hands each case's captures to ``safetensors.numpy.save_file``. A
streamed run exists not to hold every stage at once, so its ``Spool`` takes each stage as the lockstep
settles it, appends the bytes to an anonymous temporary file, and, when the run's outputs are
published, writes the header and copies the bytes behind it: the same file format (the header's
``data_offsets`` are those ``save_file`` would write, in insertion order), read back by the same
reader (:func:`read`, which ``rmlx-parity compare`` and the pytest plugin use).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
           np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
           np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16", np.dtype(np.uint32): "U32",
           np.dtype(np.uint64): "U64", np.dtype(np.bool_): "BOOL"}


def read(path: Path | str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, as NumPy arrays (BF16 ones as ``ml_dtypes.bfloat16``, which
    ``safetensors.numpy`` needs imported; it is imported here, not by the metrics: ~0.7 s a process)."""
    import ml_dtypes  # noqa: F401
    from safetensors.numpy import load_file

    return load_file(str(path))


class Spool:
    """Tensors appended one at a time, then written as one safetensors file (:meth:`finish`)."""

    def __init__(self):
        self._data = tempfile.TemporaryFile()  # anonymous: gone with the process, whatever happens
        self._header: dict[str, dict] = {}
        self._size = 0

    def add(self, name: str, value: np.ndarray) -> None:
        if name in self._header:
            raise ValueError(f"dump: stage '{name}' added twice")
        a = np.ascontiguousarray(value)
        if a.dtype not in _DTYPES:
            raise ValueError(f"dump: stage '{name}' has dtype {a.dtype}, which safetensors cannot store")
        raw = a.tobytes()
        try:
            self._data.write(raw)
            self._data.flush()
        except OSError as e:  # the temporary file system is full (or ulimit -f): bad output place, exit 2
            from rmlx.errors import InputError

            raise InputError(f"--dump: cannot spool stage '{name}' to a temporary file in {tempfile.gettempdir()} "
                             f"({e.strerror or e}); nothing was published") from None
        self._header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape),
                              "data_offsets": [self._size, self._size + len(raw)]}
        self._size += len(raw)

    def finish(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        """Write the file at ``path`` (a staging folder's: the caller publishes it atomically); the
        spooled bytes are released."""
        header = dict(self._header)
        if metadata:
            header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as save_file writes it
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            self._data.seek(0)
            shutil.copyfileobj(self._data, f, 16 << 20)
        self._data.close()
