"""mmfuse.files: only regular files are opened; every other kind is named in one line, and nothing blocks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from mmfuse.files import NotRegularFileError, check_folder, check_regular, open_regular


def test_a_regular_file_opens_and_reads(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"bytes")
    (tmp_path / "link.bin").symlink_to(tmp_path / "a.bin")  # links are followed
    for name in ("a.bin", "link.bin"):
        with open_regular(tmp_path / name) as f:
            assert f.read() == b"bytes"


def test_every_other_kind_is_refused_by_name(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    try:
        cases = {
            tmp_path / "pipe": "a FIFO (named pipe)",
            tmp_path / "sock": "a socket",
            Path("/dev/null"): "a character device",
            tmp_path: "a folder",
        }
        for path, kind in cases.items():
            with pytest.raises(
                NotRegularFileError, match=f"^image {path} is {kind.replace('(', '.').replace(')', '.')}"
            ):
                open_regular(path, "image")
    finally:
        server.close()
    with pytest.raises(FileNotFoundError, match="^file .*missing does not exist$"):
        check_regular(tmp_path / "missing")


def test_a_folder_holding_a_fifo_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    check_folder(tmp_path)
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(NotRegularFileError, match="holds 'model.safetensors', which is a FIFO"):
        check_folder(tmp_path, "model folder")
