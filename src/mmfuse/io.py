"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The bytes go to a temporary file in the target's own folder (so the rename stays on one file system), are
flushed to disk, then `os.replace` puts the file in place in one step. On any error the temporary file is
removed and the target is left as it was. Light on purpose (standard library only): the commands that only
need to write a report do not import the trainer for it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`.

    Args:
        path: the file to write (its folder must exist); an existing file is replaced.
        data: the whole new content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # unique per writer
    f = open(tmp, "xb")  # "x": never another writer's file; mode from the umask, as a plain write
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (see `atomic_write_bytes`), encoded with `encoding`."""
    atomic_write_bytes(path, text.encode(encoding))
