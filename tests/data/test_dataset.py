"""Tests of mmfuse.data.dataset: up-front validation (one-line errors naming file and row) and the dataset."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from mmfuse.data import DataError, MultiModalDataset, Record, read_records, validate_records

BOTH = ("image", "text")


@pytest.fixture
def schema(make_schema):
    return make_schema()


@pytest.fixture
def records_file(make_image, write_jsonl):
    """A JSONL file whose 4 records are all valid."""
    make_image("a.png")
    make_image("img/b.jpg", mode="L")
    rows = [
        {"image": "a.png", "text": "a cat", "label": "cat", "flag": "yes", "tags": "a|c", "score": 1.5},
        {"image": "img/b.jpg", "text": "a dog", "label": "dog", "flag": 0, "tags": None, "score": None},
        {"image": "a.png", "text": "  a fox ", "label": None, "flag": None, "tags": ["b"], "score": -2},
        {"image": "a.png", "text": "nothing"},
    ]
    return write_jsonl("train.jsonl", rows)


def _bad_file(write_jsonl, make_image, bad_row: dict) -> Path:
    make_image("a.png")
    good = {"image": "a.png", "text": "fine", "label": "cat", "flag": None, "tags": None, "score": None}
    return write_jsonl("data.jsonl", [good, good, bad_row, good])


def test_valid_records_pass(records_file, tasks, schema, encoders):
    records = read_records(records_file, schema)
    good, bad = validate_records(records, tasks, encoders)
    assert good == records and bad == []


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ({"image": "missing.png", "text": "x"}, "image 'missing.png' not found (looked in {root})"),
        (
            {"image": "broken.png", "text": "x"},
            "image 'broken.png' cannot be decoded (OSError: image file is truncated",
        ),
        (
            {"image": "broken.jpg", "text": "x"},
            "image 'broken.jpg' cannot be decoded (OSError: image file is truncated",
        ),
        ({"image": "a.png", "text": "   "}, "text is empty or missing"),
        ({"image": "a.png", "text": "x", "label": {"a": 1}}, "task 'label': label is an object"),
        ({"image": "a.png", "text": "x", "label": ["cat"]}, "task 'label': label is a list"),
        ({"image": "a.png", "text": "x", "label": "c" * 5000}, "task 'label': label is 5000 characters long"),
        ({"image": "a.png", "text": "x", "score": True}, "task 'score': regression target True is not a number"),
        ({"image": "a.png", "text": "x", "score": 1e308}, "task 'score': regression target 1e+308 overflows float32"),
        ({"image": "a.png", "text": "x", "score": 10**400}, "task 'score': regression target of 1329 bits is too"),
        ({"image": "a.png", "text": "x", "label": "wolf"}, "task 'label': label 'wolf' is not one of the classes"),
        ({"image": "a.png", "text": "x", "flag": "maybe"}, "task 'flag': label 'maybe' is not one of"),
        ({"image": "a.png", "text": "x", "tags": "a|z"}, "task 'tags': label 'z' is not one of"),
        ({"image": "a.png", "text": "x", "score": "NaN"}, "task 'score': regression target 'NaN' is not finite"),
        ({"image": "a.png", "text": "x", "score": "high"}, "task 'score': regression target 'high' is not a number"),
    ],
)
def test_each_bad_record_is_a_one_line_error_naming_file_and_row(
    tmp_path, make_image, write_jsonl, tasks, schema, encoders, bad_row, reason
):
    make_image("broken.png", truncate=True)
    (tmp_path / "broken.jpg").write_bytes(_truncated_jpeg(tmp_path))
    path = _bad_file(write_jsonl, make_image, bad_row)
    records = read_records(path, schema)
    with pytest.raises(DataError) as info:
        validate_records(records, tasks, encoders)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:3: " + reason.format(root=tmp_path)), message


def _truncated_jpeg(folder: Path) -> bytes:
    Image.effect_noise((64, 64), 60).convert("RGB").save(folder / "full.jpg", quality=90)
    data = (folder / "full.jpg").read_bytes()
    return data[: len(data) // 2]


def test_non_text_text_is_an_error_naming_the_row(write_jsonl, make_image, make_schema):
    path = _bad_file(write_jsonl, make_image, {"image": "a.png", "text": 5})
    schema = make_schema(labels=["label"])
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}:3: text: text field 'text' must be a string, got int"
    ):
        read_records(path, schema)
    errors: list = []
    assert len(read_records(path, schema, errors=errors)) == 3
    assert errors == [(f"{path}:3", "text: text field 'text' must be a string, got int 5")]


def test_nan_regression_target_in_jsonl_and_csv(write_jsonl, write_csv, make_image, tasks, make_schema, encoders):
    make_image("a.png")
    schema = make_schema(labels=["score"])
    path = write_jsonl("r.jsonl", ['{"image": "a.png", "text": "x", "score": NaN}'])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: task 'score': .* not finite"):
        validate_records(read_records(path, schema), tasks, encoders)
    path = write_csv("r.csv", [["image", "text", "score"], ["a.png", "x", "1"], ["a.png", "y", "nan"]])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: task 'score': .* not finite"):
        validate_records(read_records(path, schema), tasks, encoders)


def test_first_bad_record_is_reported(write_jsonl, make_image, tasks, make_schema, encoders):
    make_image("a.png")
    rows = [{"image": "a.png", "text": "x", "label": "wolf"}, {"image": "gone.png", "text": "x"}]
    path = write_jsonl("r.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: task 'label'"):
        validate_records(read_records(path, make_schema(labels=["label"])), tasks, encoders)


def test_skip_bad_returns_the_good_records_and_lists_the_bad(
    tmp_path, make_image, write_jsonl, tasks, make_schema, encoders
):
    make_image("a.png")
    make_image("cut.png", truncate=True)
    rows = [
        {"image": "a.png", "text": "ok", "label": "cat"},
        {"image": "cut.png", "text": "x"},
        {"image": "a.png", "text": ""},
        {"image": "a.png", "text": "ok too", "score": "3"},
        {"image": "nope.png", "text": "x"},
    ]
    path = write_jsonl("r.jsonl", rows)
    records = read_records(path, make_schema(labels=["label", "score"]))
    good, bad = validate_records(records, tasks, encoders, skip_bad=True)
    assert [r.inputs["text"] for r in good] == ["ok", "ok too"]
    assert [source for source, _ in bad] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert "cannot be decoded" in bad[0][1] and bad[1][1] == "text is empty or missing" and "not found" in bad[2][1]


def test_every_pil_mode_and_high_depth_images_validate(make_image, tasks, encoders):
    modes = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"]
    records = [Record({"image": str(make_image(f"{m}.tiff", mode=m))}, {}, f"f:{i}") for i, m in enumerate(modes)]
    good, bad = validate_records(records, {}, {"image": encoders["image"]})
    assert len(good) == len(modes) and not bad


def test_only_the_model_modalities_are_checked(write_jsonl, tasks, make_schema, encoders):
    path = write_jsonl("r.jsonl", [{"image": "nope.png", "text": ""}])
    records = read_records(path, make_schema(labels=[]))
    assert len(validate_records(records, tasks, {"text": encoders["text"]}, skip_bad=True)[1]) == 1
    assert len(validate_records(records, tasks, {"image": encoders["image"]}, skip_bad=True)[1]) == 1
    assert validate_records(records, tasks, {})[0] == records


def test_missing_modalities_are_allowed_on_request(write_jsonl, make_image, tasks, make_schema, encoders):
    make_image("a.png")
    path = write_jsonl("r.jsonl", [{"image": None, "text": "x"}, {"image": "a.png", "text": None}])
    records = read_records(path, make_schema(labels=[]))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: image is empty or missing"):
        validate_records(records, tasks, encoders)
    assert validate_records(records, tasks, encoders, allow_missing=True)[0] == records


def test_each_distinct_input_is_checked_once(monkeypatch, make_image, tasks, encoders):
    path = str(make_image("a.png"))
    other = str(make_image("b.png"))
    image = encoders["image"]
    calls: list[str] = []
    real = type(image).check
    monkeypatch.setattr(type(image), "check", lambda self, ref: calls.append(ref) or real(self, ref))
    records = [Record({"image": path if i % 3 else other, "text": "x"}, {}, f"f:{i}") for i in range(300)]
    validate_records(records, tasks, encoders, workers=2)
    assert sorted(calls) == sorted([path, other])


def test_dataset_items(records_file, tasks, schema, encoders, monkeypatch):
    records = read_records(records_file, schema)
    seen: list[tuple[str, bool]] = []
    image = encoders["image"]
    real = type(image).preprocess
    monkeypatch.setattr(
        type(image),
        "preprocess",
        lambda self, raw, train=False: seen.append((raw.mode, train)) or real(self, raw, train),
    )
    ds = MultiModalDataset(records, tasks, encoders, train=True)
    assert len(ds) == 4
    item = ds[1]
    assert item["index"] == 1
    assert item["inputs"]["image"].shape == (3, 8, 8) and item["inputs"]["text"] == "a dog"
    assert item["labels"] == {"label": 1, "flag": 0.0, "tags": None, "score": None}
    assert ds[0]["labels"] == {"label": 0, "flag": 1.0, "tags": [1.0, 0.0, 1.0, 0.0], "score": 1.5}
    assert seen == [("RGB", True), ("RGB", True)]  # the grayscale JPEG arrives as RGB


def test_dataset_encodes_labels_once_in_init(records_file, tasks, schema, encoders, monkeypatch):
    records = read_records(records_file, schema)
    ds = MultiModalDataset(records, tasks, {"text": encoders["text"]})

    def fail(raw):
        raise AssertionError("encode called per item")

    monkeypatch.setattr(tasks["label"], "encode", fail)
    assert [ds[i]["labels"]["label"] for i in range(4)] == [0, 1, None, None]
    assert set(ds[0]["inputs"]) == {"text"}


def test_dataset_rejects_a_label_its_task_refuses(tasks):
    with pytest.raises(DataError, match=r"^f:9: task 'label'"):
        MultiModalDataset([Record({"text": "x"}, {"label": "wolf"}, "f:9")], tasks, {})


def test_missing_modality_gives_none(tasks, make_image, encoders):
    records = [
        Record({"image": None, "text": "x"}, {}, "f:1"),
        Record({"image": str(make_image("a.png", mode="RGBA")), "text": None}, {}, "f:2"),
    ]
    ds = MultiModalDataset(records, tasks, encoders)
    assert ds[0]["inputs"]["image"] is None and ds[0]["inputs"]["text"] == "x"
    assert ds[1]["inputs"]["text"] is None and ds[1]["inputs"]["image"].shape == (3, 8, 8)
