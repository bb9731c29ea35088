"""Files written atomically and content hashed, in one place.

Atomic writes: a reader sees the old file or the new one, never half of one. The bytes go to a temporary file in
the target's own folder (so the rename stays on one file system), are flushed to disk, then `os.replace` puts the
file in place in one step. On any error the temporary file is removed and the target is left as it was.

Hashes: SHA-256 of a file's bytes (read in 1 MiB blocks, regular files only: a FIFO never blocks the reader) or of
a text's UTF-8 bytes (a lone surrogate, from a byte that was not UTF-8, is kept as it is). Cache keys are built
from them, so their output must never change: a changed digest would invalidate every user's feature cache.

Light on purpose (standard library only): the commands that only need to write a report or hash a file do not
import torch for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mmfuse.files import open_regular

CHUNK = 1 << 20  # bytes read at a time when hashing


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path next to `path` for a writer that wants a file name; on a clean exit the file it
    wrote is flushed to disk and renamed over `path`, on an error it is removed and `path` is left as it was.

    The temporary name is `.<name>.<pid>.<8 hex digits>.tmp`: unique per writer, thread and process.

    Args:
        path: the file to write (its folder must exist); an existing file is replaced.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace` (see `atomic_path`).

    Args:
        path: the file to write (its folder must exist); an existing file is replaced.
        data: the whole new content.
    """
    with atomic_path(path) as tmp, open(tmp, "xb") as f:  # "x": never another writer's file; mode from the umask
        f.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (see `atomic_write_bytes`), encoded with `encoding`."""
    atomic_write_bytes(path, text.encode(encoding))


def sha256_stream(f: BinaryIO, prefix: bytes = b"") -> Any:
    """SHA-256 of `prefix` (bytes the caller already read from `f`) then the rest of the open binary file `f`,
    read in `CHUNK` blocks.

    Returns:
        The `hashlib` digest object (`.hexdigest()`, `.digest()`).
    """
    digest = hashlib.sha256(prefix)
    while block := f.read(CHUNK):
        digest.update(block)
    return digest


def sha256_file(path: str | os.PathLike[str], what: str = "file") -> str:
    """Hex SHA-256 of a regular file's bytes; `what` names the file in the one-line error of a FIFO or a folder."""
    with open_regular(path, what) as f:
        return sha256_stream(f).hexdigest()


def sha256_text(text: str) -> str:
    """Hex SHA-256 of `text` in UTF-8, a lone surrogate kept as its own bytes (`surrogatepass`)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
