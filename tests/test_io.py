"""`mmfuse.io`: atomic writes leave the old file or the new one, never half of one, and no temporary files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmfuse.io import atomic_write_bytes, atomic_write_text


def test_writes_and_replaces_leaving_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    atomic_write_text(path, "first ±\n")
    atomic_write_text(path, "second ±\n")
    assert path.read_text(encoding="utf-8") == "second ±\n"
    atomic_write_bytes(tmp_path / "blob.bin", b"\x00\xff")
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "report.md"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "compare.json"
    path.write_text("old")

    def refuse(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["compare.json"]


def test_the_file_mode_is_a_plain_writes(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == plain.stat().st_mode
