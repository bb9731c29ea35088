"""The easy-VQA data set (shipped by the `easy-vqa` package) as records with four tasks.

Tasks: `answer` (13 answers), `question_type` (yes/no, shape, color, from the answer) and the image
labels `shape` and `color`. Each image shows exactly one shape in one colour; these are read off
the answers of that image's questions ("what is the blue shape?" -> rectangle tells both; "is
there not a red shape?" -> no tells red; two "no"s to "is there a circle/triangle?" leave rectangle)
and attached to every question of the image, or None where no question reveals them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmfuse.data.records import DataError, Record, Schema, default_group_by, records_from_rows, split_records
from mmfuse.encoders.base import DataRoot

logger = logging.getLogger(__name__)

SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
OFFICIAL_SPLITS = ("train", "test")


def easy_vqa_root() -> Path:
    """The `data` folder of the installed `easy-vqa` package."""
    import easy_vqa

    return Path(easy_vqa.__file__).resolve().parent / "data"


def _answers() -> list[str]:
    lines = (easy_vqa_root() / "answers.txt").read_text().splitlines()
    return [a.strip() for a in lines if a.strip()]


ANSWERS: list[str] = _answers()
COLORS: tuple[str, ...] = tuple(a for a in ANSWERS if a not in SHAPES and a not in YES_NO)

EASY_VQA_TASKS: dict[str, dict[str, Any]] = {
    "answer": {"kind": "multiclass", "classes": list(ANSWERS)},
    "question_type": {"kind": "multiclass", "classes": ["yes/no", "shape", "color"]},
    "shape": {"kind": "multiclass", "classes": list(SHAPES)},
    "color": {"kind": "multiclass", "classes": list(COLORS)},
}

_WORD = re.compile(r"[a-z]+")
_NEGATED = re.compile(r"\bnot\b|^is no\b")


def question_type(answer: str) -> str:
    """The question type of an answer: "yes/no", "shape" or "color"."""
    if answer in YES_NO:
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    raise ValueError(f"unknown easy-VQA answer {answer!r}")


class _ImageFacts:
    """What the questions of one image tell about its shape and colour."""

    def __init__(self) -> None:
        self.seen: dict[str, set[str]] = {"shape": set(), "color": set()}
        self.ruled_out: dict[str, set[str]] = {"shape": set(), "color": set()}

    def add(self, text: str, answer: str) -> None:
        words = [w for w in _WORD.findall(text.lower()) if w in SHAPES or w in COLORS]
        if answer in YES_NO:
            present = (answer == "yes") != bool(_NEGATED.search(text.lower()))
            for w in words:
                (self.seen if present else self.ruled_out)[_attribute(w)].add(w)
        else:
            # An open question presupposes what it names ("what color is the circle?") and its answer is a fact.
            for w in [*words, answer]:
                self.seen[_attribute(w)].add(w)

    def value(self, attribute: str, image: str) -> str | None:
        seen, out = self.seen[attribute], self.ruled_out[attribute]
        values = SHAPES if attribute == "shape" else COLORS
        left = set(values) - out
        if len(seen) > 1 or seen & out or not left:
            found = f"seen {sorted(seen)}, ruled out {sorted(out)}"
            raise DataError(f"{image}: questions disagree about its {attribute}: {found}")
        if seen:
            return next(iter(seen))
        return next(iter(left)) if len(left) == 1 else None


def _attribute(word: str) -> str:
    return "shape" if word in SHAPES else "color"


def image_labels(questions: Iterable[list[Any]], where: str = "easy_vqa") -> dict[int, dict[str, str | None]]:
    """{image id: {"shape": ..., "color": ...}} derived from `[text, answer, image_id]` questions.

    Raises:
        DataError: when two questions of one image reveal different shapes or colours.
    """
    facts: dict[int, _ImageFacts] = defaultdict(_ImageFacts)
    for text, answer, image_id in questions:
        facts[image_id].add(text, answer)
    return {i: {a: f.value(a, f"{where} image {i}") for a in ("shape", "color")} for i, f in facts.items()}


def easy_vqa_rows(split: str) -> list[tuple[int, dict[str, Any]]]:
    """(question number, row) of an official split: `image` (relative to `easy_vqa_root()`), `text` and the
    four tasks' labels (`shape`/`color` None where the image's questions do not reveal them)."""
    folder = easy_vqa_root() / split
    questions = json.loads((folder / "questions.json").read_text())
    known = image_labels(questions, f"easy_vqa/{split}")
    rows = []
    for number, (text, answer, image_id) in enumerate(questions, start=1):
        row = {"image": f"{split}/images/{image_id}.png", "text": text, "answer": answer}
        rows.append((number, {**row, "question_type": question_type(answer), **known[image_id]}))
    return rows


def label_coverage(records: list[Record], task: str, modality: str = "image") -> tuple[float, float]:
    """(share of distinct inputs of `modality`, share of records) whose `task` label is known."""
    by_input = {r.inputs.get(modality): r.labels.get(task) is not None for r in records}
    inputs = sum(by_input.values()) / max(len(by_input), 1)
    rows = sum(r.labels.get(task) is not None for r in records) / max(len(records), 1)
    return inputs, rows


def load_easy_vqa(
    schema: Schema,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    errors: list[tuple[str, str]] | None = None,
) -> dict[str, list[Record]]:
    """easy-VQA as {"train", "val", "test"} records, read through `schema` like any records file.

    The rows have the fields `image`, `text`, `answer`, `question_type`, `shape` and `color`.

    Args:
        schema: the modalities' encoders and fields, the tasks' label fields.
        val_fraction: share of the official train groups (by default: images, with all their questions)
            held out as "val".
        seed: seed of the train/val split and of the `limit` shuffle.
        limit: keep only the first `limit` records of each split after a seeded shuffle.
        errors: collects bad rows instead of raising (`data.skip_bad`).
    """
    root = DataRoot(easy_vqa_root())
    read = {"schema": schema, "root": root, "errors": errors}
    train = records_from_rows(easy_vqa_rows("train"), "easy_vqa/train/questions.json", **read)
    group_by = schema.group_by or default_group_by(train, schema.encoders)
    splits = split_records(train, val_fraction, 0.0, seed, group_by)
    test = records_from_rows(easy_vqa_rows("test"), "easy_vqa/test/questions.json", **read)
    splits["test"] = [dataclasses.replace(r, split="test") for r in test]
    for task in ("shape", "color"):
        if task in schema.labels and group_by:
            share, rows = label_coverage(train, task, group_by)
            logger.info(
                "easy-VQA train: %s known for %.1f%% of %ss (%.1f%% of questions)",
                task,
                100 * share,
                group_by,
                100 * rows,
            )
    if limit is not None:
        for name, records in splits.items():
            shuffled = list(records)
            random.Random(seed).shuffle(shuffled)
            splits[name] = shuffled[:limit]
    return splits
