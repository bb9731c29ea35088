"""Writing a generated data set all at once: built in a sibling folder, then moved into place.

An interrupted generation leaves no half-written set behind, and a folder that holds a complete generation is
never mixed with a new one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def build_into(out: Path, build: Callable[[Path], T]) -> T:
    """Run `build(folder)` on a fresh folder next to `out`, then replace `out` with it.

    The caller has checked that `out` is absent, empty or a previous generation of its own: it is deleted.

    Args:
        out: destination folder.
        build: writes the set into the folder it is given; its result is returned.

    Returns:
        What `build` returned.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = build(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
