"""Glyphs: a generated VQA set of digits where frozen ImageNet features are weak, for fine-tuning recipes.

Every image shows one digit (0-9) drawn in one of the DejaVu fonts at a random size, rotation (within 30 degrees),
position and colour, over a noisy background with clutter strokes; three questions are asked about each image:

    digit   "what digit is shown?"           0-9
    even    "is the digit even?"             yes/no
    large   "is the digit greater than four?" yes/no

The records of an image share its file, so a fine-tuned image encoder runs once per image in a batch (the
de-duplicated encoder path, with `data.group_batches: true`). Answers follow from the digit by construction.
Splits come from separate seeded streams (no image is in two splits).

Files under `out_dir`: `images/{train,val,test}/NNNNNN.png`, `train.jsonl`, `val.jsonl`, `test.jsonl` (records:
image, text, answer, question), `manifest.json` (seed and sizes: a folder with the same manifest is reused as is;
one with another manifest is replaced; one holding anything else is refused) and a `.gitignore`.

    mmfuse data glyphs --out data/glyphs
    mmfuse train configs/glyphs.yaml --out runs/glyphs-frozen       # see docs/finetune.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mmfuse.data.records import DataError
from mmfuse.datasets.folders import build_into

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
QUESTIONS = {
    "digit": ("what digit is shown?", lambda d: str(d)),
    "even": ("is the digit even?", lambda d: "yes" if d % 2 == 0 else "no"),
    "large": ("is the digit greater than four?", lambda d: "yes" if d > 4 else "no"),
}
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
_OWN_NAMES = {"images", "manifest.json", ".gitignore", *(f"{s}.jsonl" for s in SPLIT_SEEDS)}


def fonts() -> list[Path]:
    """The DejaVu font files (sorted); DataError when there are none."""
    found = sorted(FONT_DIR.glob("DejaVu*.ttf"))
    if not found:
        raise DataError(f"no DejaVu fonts in {FONT_DIR}; install fonts-dejavu-core")
    return found


def draw_glyph(digit: int, rng: np.random.Generator, size: int, font_files: list[Path]) -> Image.Image:
    """One (size, size) RGB image of `digit`: random font, size, rotation, position, colours, clutter, noise."""
    scale = 4  # drawn at 4x, then downsampled (anti-aliased)
    side = size * scale
    bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(bg.astype(int) - fg.astype(int)).sum() < 200:  # enough contrast to stay readable
        fg = rng.integers(0, 256, 3)
    canvas = Image.new("RGB", (side, side), tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):  # clutter strokes in random colours
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, side, 4))
        draw.line((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(2, 7)))
    font = ImageFont.truetype(str(font_files[int(rng.integers(len(font_files)))]), int(side * rng.uniform(0.35, 0.6)))
    glyph = Image.new("L", (side, side), 0)
    ImageDraw.Draw(glyph).text((side / 2, side / 2), str(digit), fill=255, font=font, anchor="mm")
    glyph = glyph.rotate(float(rng.uniform(-30, 30)), resample=Image.BILINEAR)
    shift = (rng.uniform(-0.2, 0.2, 2) * side).astype(int)
    glyph = glyph.transform(glyph.size, Image.AFFINE, (1, 0, -int(shift[0]), 0, 1, -int(shift[1])))
    canvas.paste(Image.new("RGB", (side, side), tuple(int(c) for c in fg)), (0, 0), glyph)
    small = canvas.resize((size, size), Image.LANCZOS).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))
    noisy = np.asarray(small, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_split(out: Path, split: str, n: int, size: int, seed: int) -> int:
    """`n` images of one split and its records file; the number of records."""
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    font_files = fonts()
    lines = []
    for i in range(n):
        digit = int(rng.integers(10))
        name = f"images/{split}/{i:06d}.png"
        draw_glyph(digit, rng, size, font_files).save(out / name)
        for question, (text, answer) in QUESTIONS.items():
            lines.append(json.dumps({"image": name, "text": text, "answer": answer(digit), "question": question}))
    (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)


def previous_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of the glyphs set in `out`; None when `out` is absent or empty.

    Raises:
        DataError: when `out` is not a folder, or holds anything that this generator did not write.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    names = {p.name for p in out.iterdir()}
    if not names:
        return None
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        ours = isinstance(manifest, dict) and set(manifest) == {"seed", "size", "images", "version"}
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours or names - _OWN_NAMES:
        raise DataError(f"{out}: not empty and not a glyphs data set; choose an empty or new folder")
    return manifest


def generate(
    out_dir: str | Path, n_train: int = 4500, n_val: int = 300, n_test: int = 300, size: int = 64, seed: int = 0
) -> dict[str, int]:
    """Write the set (or reuse a folder generated with the same parameters); {split: records}.

    The set is built next to `out_dir` and moved into place when complete (`build_into`), so an interrupted run
    leaves no half-written set. A previous glyphs generation with other parameters is replaced.

    Raises:
        DataError: an `out_dir` that holds other files, or no fonts.
    """
    out = Path(out_dir)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    manifest = {"seed": seed, "size": size, "images": sizes, "version": 1}
    if previous_manifest(out) == manifest:
        return {s: 3 * n for s, n in sizes.items()}
    fonts()  # no fonts: an error before anything is written

    def build(folder: Path) -> dict[str, int]:
        (folder / ".gitignore").write_text("*\n")
        counts = {s: write_split(folder, s, n, size, seed) for s, n in sizes.items()}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        return counts

    return build_into(out, build)


if __name__ == "__main__":  # `python -m mmfuse.datasets.glyphs ARGS` is `mmfuse data glyphs ARGS`
    from mmfuse.cli import main

    sys.exit(main(["data", "glyphs", *sys.argv[1:]]))
