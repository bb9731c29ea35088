"""Opening the files a user names (records, images, `.npy` vectors, weights, model folders) safely.

Only regular files are read. A FIFO, a socket or a device would block a reader forever or stream without
end, so each is refused as one line before anything opens it, and `open_regular` opens without blocking
and checks again on the open descriptor (a file swapped for a FIFO in between is caught too).
Standard library only: the records layer and the command line import it without torch.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class NotRegularFileError(OSError):
    """A path that exists but is not a regular file (a folder, FIFO, socket or device); one-line message."""


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words ("a FIFO (named pipe)", "a folder", ...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str | os.PathLike[str], what: str = "file") -> None:
    """Refuse anything but an existing regular file (links are followed), without opening it.

    Raises:
        FileNotFoundError: "{what} PATH does not exist".
        NotRegularFileError: "{what} PATH is a FIFO (named pipe), not a regular file", and so on.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {os.fspath(path)} does not exist") from None
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(f"{what} {os.fspath(path)} is {kind_of(mode)}, not a regular file")


def open_regular(path: str | os.PathLike[str], what: str = "file") -> BinaryIO:
    """Open a regular file for binary reading; anything else is refused (`check_regular`) and never blocks."""
    check_regular(path, what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced between the stat and the open
            raise NotRegularFileError(f"{what} {os.fspath(path)} is {kind_of(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_folder(path: str | os.PathLike[str], what: str = "folder") -> None:
    """Refuse a folder holding an entry that is neither a regular file nor a folder (a FIFO would hang a reader).

    Raises:
        NotRegularFileError: "{what} PATH holds NAME, which is a FIFO (named pipe), not a regular file".
    """
    for entry in Path(path).iterdir():
        try:
            mode = os.stat(entry).st_mode
        except OSError:  # a dangling link: the library that reads the folder says what is missing
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise NotRegularFileError(
                f"{what} {os.fspath(path)} holds {entry.name!r}, which is {kind_of(mode)}, not a regular file"
            )
