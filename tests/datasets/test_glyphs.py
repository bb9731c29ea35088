"""The generated glyphs set: three consistent questions per image, separate splits, reuse by manifest."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from mmfuse.cli import main
from mmfuse.datasets.glyphs import generate


def test_every_image_has_three_answers_that_agree(tmp_path: Path) -> None:
    counts = generate(tmp_path, n_train=8, n_val=2, n_test=2, size=32)
    assert counts == {"train": 24, "val": 6, "test": 6}
    for split in ("train", "val", "test"):
        by_image = defaultdict(dict)
        for line in (tmp_path / f"{split}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            by_image[rec["image"]][rec["question"]] = rec["answer"]
        for image, answers in by_image.items():
            assert image.startswith(f"images/{split}/")
            assert Image.open(tmp_path / image).size == (32, 32)
            digit = int(answers["digit"])
            assert answers["even"] == ("yes" if digit % 2 == 0 else "no")
            assert answers["large"] == ("yes" if digit > 4 else "no")


def test_same_manifest_is_reused_and_splits_differ(tmp_path: Path) -> None:
    generate(tmp_path, n_train=3, n_val=3, n_test=3, size=32)
    stamp = (tmp_path / "train.jsonl").stat().st_mtime_ns
    generate(tmp_path, n_train=3, n_val=3, n_test=3, size=32)
    assert (tmp_path / "train.jsonl").stat().st_mtime_ns == stamp
    train = (tmp_path / "images/train/000000.png").read_bytes()
    assert train != (tmp_path / "images/val/000000.png").read_bytes()


def test_bad_arguments_are_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "glyphs", "--out", str(tmp_path), "--size", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mmfuse data glyphs: error: " in err and "--size in 16..512" in err
    assert not any(tmp_path.iterdir())  # nothing written
