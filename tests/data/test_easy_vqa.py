"""Tests of mmfuse.data.easy_vqa: official counts, the by-image val split, derived tasks and image labels."""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import pytest

from mmfuse.data import DataError, encode_labels
from mmfuse.data.easy_vqa import (
    COLORS,
    EASY_VQA_TASKS,
    SHAPES,
    easy_vqa_root,
    image_labels,
    label_coverage,
    load_easy_vqa,
    question_type,
)
from mmfuse.tasks import build_task

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def schema(make_schema):
    return make_schema(labels=list(EASY_VQA_TASKS))


@pytest.fixture(scope="module")
def splits(schema):
    return load_easy_vqa(schema)


def test_official_counts(splits):
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert len(train) + len(val) == 38_575 and len(test) == 9_673
    assert len({r.inputs["image"] for r in train + val}) == 4_000 and len({r.inputs["image"] for r in test}) == 1_000


def test_val_is_held_out_by_image(splits):
    train, val = ({r.inputs["image"] for r in splits[k]} for k in ("train", "val"))
    assert not train & val
    assert len(val) == 400
    assert all(r.split == name for name, records in splits.items() for r in records)


def test_split_and_limit_are_seeded(schema):
    first, again, other = (load_easy_vqa(schema, seed=s, limit=50) for s in (0, 0, 1))
    assert {k: len(v) for k, v in first.items()} == {"train": 50, "val": 50, "test": 50}
    assert first == again and first["val"] != other["val"]


def test_tasks_describe_the_answers():
    answers = [a.strip() for a in (easy_vqa_root() / "answers.txt").read_text().splitlines() if a.strip()]
    assert EASY_VQA_TASKS["answer"] == {"kind": "multiclass", "classes": answers} and len(answers) == 13
    assert EASY_VQA_TASKS["question_type"]["classes"] == ["yes/no", "shape", "color"]
    assert EASY_VQA_TASKS["shape"]["classes"] == ["circle", "rectangle", "triangle"]
    assert sorted(EASY_VQA_TASKS["color"]["classes"]) == sorted(
        ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow"]
    )
    assert set(answers) == {"yes", "no", *SHAPES, *COLORS}


def test_records_and_question_types(splits):
    first = splits["test"][0]
    assert first.source == "easy_vqa/test/questions.json:1" and first.inputs["image"].endswith("test/images/0.png")
    expected = {"yes": "yes/no", "no": "yes/no", "circle": "shape", "teal": "color"}
    assert {a: question_type(a) for a in expected} == expected
    for r in splits["train"] + splits["val"] + splits["test"]:
        assert r.labels["question_type"] == question_type(r.labels["answer"])
    with pytest.raises(ValueError):
        question_type("purple")


def test_all_labels_encode(splits):
    tasks = {name: build_task(name, **spec) for name, spec in EASY_VQA_TASKS.items()}
    for r in splits["val"] + splits["test"]:
        encode_labels(r, tasks)


@pytest.mark.parametrize(
    ("questions", "shape", "color"),
    [
        ([["what is the blue shape?", "rectangle"]], "rectangle", "blue"),
        ([["what color is the triangle?", "red"]], "triangle", "red"),
        ([["what color is the shape?", "gray"]], None, "gray"),
        ([["does the image contain a rectangle?", "yes"]], "rectangle", None),
        ([["is there a triangle?", "no"]], None, None),
        ([["is there a red shape?", "no"]], None, None),
        ([["is there a red shape?", "yes"]], None, "red"),
        ([["does the image not contain a gray shape?", "no"]], None, "gray"),
        ([["is no circle present?", "no"]], "circle", None),
        ([["is there not a circle?", "yes"]], None, None),
        ([["is there a triangle?", "no"], ["is a circle present?", "no"]], "rectangle", None),
    ],
)
def test_image_labels_from_question_text(questions, shape, color):
    labels = image_labels([[text, answer, 7] for text, answer in questions])
    assert labels == {7: {"shape": shape, "color": color}}


def test_contradicting_questions_are_a_data_error():
    with pytest.raises(DataError, match="image 3: questions disagree about its shape"):
        image_labels([["what shape is present?", "circle", 3], ["is there a triangle?", "yes", 3]])
    with pytest.raises(DataError, match="color"):
        image_labels([["is there a red shape?", "yes", 3], ["is there not a red shape?", "yes", 3]])


@pytest.mark.parametrize("split", ["train", "test"])
def test_shape_and_color_are_consistent_and_mostly_known(split, splits):
    questions = json.loads((easy_vqa_root() / split / "questions.json").read_text())
    labels = image_labels(questions)  # raises if any image would get two shapes or two colours
    direct = image_labels([q for q in questions if q[1] not in ("yes", "no")])
    for i, known in direct.items():  # open questions never disagree with the yes/no inferences
        assert all(v is None or v == labels[i][k] for k, v in known.items())
    records = splits["test"] if split == "test" else splits["train"] + splits["val"]
    per_image = defaultdict(set)
    for r in records:
        per_image[r.inputs["image"]].add((r.labels["shape"], r.labels["color"]))
    assert all(len(v) == 1 for v in per_image.values())
    for task in ("shape", "color"):
        images, rows = label_coverage(records, task)
        logger.info(
            "easy-VQA %s: %s known for %.1f%% of images, %.1f%% of questions", split, task, 100 * images, 100 * rows
        )
        assert images > 0.9 and rows > 0.9


def test_derived_colors_match_the_pixels(splits):
    """The colour read off the questions is the colour the shape is drawn in (50 images)."""
    from PIL import Image

    rgb = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
    rgb |= {"teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0)}
    known = {r.inputs["image"]: r.labels["color"] for r in splits["test"] if r.labels["color"] is not None}
    for path, color in list(known.items())[:50]:
        with Image.open(path) as im:
            counts = sorted(im.convert("RGB").getcolors(64 * 64), reverse=True)
        assert counts[1][1] == rgb[color], path  # counts[0] is the background
