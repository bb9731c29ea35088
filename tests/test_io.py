"""`mmfuse.io`: atomic writes leave the old file or the new one, never half of one, and no temporary files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mmfuse.io import CHUNK, atomic_path, atomic_write_bytes, atomic_write_text, sha256_file, sha256_stream, sha256_text


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


def test_atomic_path_puts_a_named_writers_file_in_place_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "shard.bin"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".shard.bin.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(RuntimeError, match="writer failed"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["shard.bin"]


def test_hashes_are_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    """Cache keys are built from these digests: golden values (FIPS 180-2 test vectors), so they never drift."""
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_text("abc") == abc
    assert sha256_text("\udcff") == hashlib.sha256(b"\xed\xb3\xbf").hexdigest()  # a lone surrogate, kept as is
    (tmp_path / "abc").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc") == abc
    big = tmp_path / "big"
    big.write_bytes(b"a" * 1_000_000 + b"b" * (CHUNK + 7))  # more than one block
    assert sha256_file(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    with open(big, "rb") as f:
        head = f.read(10)
        assert sha256_stream(f, prefix=head).hexdigest() == hashlib.sha256(big.read_bytes()).hexdigest()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match=r"weights file .*fifo is a FIFO \(named pipe\), not a regular file"):
        sha256_file(tmp_path / "fifo", "weights file")
