"""Tests of mmfuse.data.records: reading JSONL/CSV, one-line errors, splits, class inference."""

from __future__ import annotations

import os

import pytest

from mmfuse.data import DataError, Record, infer_classes, load_record_splits, read_records, split_records

LABELS = ["label", "flag", "tags", "score"]


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_jsonl_reads_records_with_default_image_root(tmp_path, write_jsonl):
    rows = [
        {"image": "img/a.png", "text": "a cat", "label": "cat", "flag": 1, "tags": ["a", "b"], "score": 0.5},
        "",  # blank lines are skipped but counted
        {"image": "b.png", "text": "a dog", "label": "", "flag": None, "score": 2},
    ]
    path = write_jsonl("sub/train.jsonl", rows)
    records = read_records(path, label_fields=LABELS)
    assert [r.image for r in records] == [str(tmp_path / "sub/img/a.png"), str(tmp_path / "sub/b.png")]
    assert all(os.path.isabs(r.image) for r in records)
    assert records[0].labels == {"label": "cat", "flag": 1, "tags": ["a", "b"], "score": 0.5}
    # "" and null are missing, an absent key is missing too: never an error
    assert records[1].labels == {"label": None, "flag": None, "tags": None, "score": 2}
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]
    assert records[0].text == "a cat" and records[0].split is None


def test_explicit_image_root_and_absolute_paths(tmp_path, write_jsonl):
    path = write_jsonl("r.jsonl", [{"image": "a.png", "text": "t"}, {"image": "/abs/b.png", "text": "t"}])
    records = read_records(path, label_fields=[], image_root=tmp_path / "images")
    assert records[0].image == str(tmp_path / "images" / "a.png")
    assert records[1].image == "/abs/b.png"


def test_label_fields_may_map_tasks_to_other_fields(write_jsonl):
    path = write_jsonl("r.jsonl", [{"image": "a.png", "text": "t", "y": "cat"}])
    assert read_records(path, label_fields={"label": "y"})[0].labels == {"label": "cat"}


def test_csv_reads_records_and_counts_the_header_as_line_1(tmp_path, write_csv):
    rows = [
        ["image", "text", "label", "score", "split"],
        ["a.png", "a cat", "cat", "1.5", "train"],
        ["b.png", "two\nlines", "", " ", "test"],
        ["c.png", "a fox", "fox", "3", ""],
    ]
    path = write_csv("r.csv", rows)
    records = read_records(path, label_fields=["label", "score"], image_root="imgs")
    assert records[0].image == os.path.abspath("imgs/a.png")
    assert records[0].labels == {"label": "cat", "score": "1.5"}
    assert records[1].labels == {"label": None, "score": None}
    assert records[1].text == "two\nlines"
    # the quoted two-line cell takes lines 3-4, so the next row starts on line 5
    assert [r.source for r in records] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert [r.split for r in records] == ["train", "test", None]


def test_json_array_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('[{"image": "a.png", "text": "x", "label": "cat"}, {"image": "b.png", "text": "y"}]')
    records = read_records(path, label_fields=["label"])
    assert [r.labels["label"] for r in records] == ["cat", None]
    assert records[1].source == f"{path}:2"


def test_missing_file_is_a_data_error(tmp_path):
    message = _error(read_records, tmp_path / "nope.jsonl", label_fields=[])
    assert str(tmp_path / "nope.jsonl") in message and "not found" in message


def test_bad_json_line_names_file_and_line(write_jsonl):
    path = write_jsonl(
        "r.jsonl", [{"image": "a.png", "text": "x"}, {"image": "b.png", "text": "y"}, '{"image": "c.png",']
    )
    message = _error(read_records, path, label_fields=[])
    assert message.startswith(f"{path}:3: bad JSON")


def test_json_line_that_is_not_an_object(write_jsonl):
    path = write_jsonl("r.jsonl", [{"image": "a.png", "text": "x"}, "[1, 2]"])
    assert _error(read_records, path, label_fields=[]).startswith(f"{path}:2: a record must be a JSON object")


@pytest.mark.parametrize("field", ["image", "text"])
def test_record_without_the_image_or_text_field(write_jsonl, field):
    row = {"image": "b.png", "text": "y"}
    del row[field]
    path = write_jsonl("r.jsonl", [{"image": "a.png", "text": "x"}, row])
    message = _error(read_records, path, label_fields=[])
    assert message.startswith(f"{path}:2: record has no {field!r} field")


def test_optional_modality_fields_for_prediction_inputs(write_jsonl):
    path = write_jsonl("r.jsonl", [{"image": "a.png"}, {"text": "only text"}])
    records = read_records(path, label_fields=[], required=())
    assert records[0].text is None and records[1].image is None and records[1].text == "only text"
    assert "no 'image' field" in _error(read_records, path, label_fields=[], required=("image",))


def test_null_image_or_text_is_a_missing_modality_not_a_read_error(write_jsonl):
    path = write_jsonl("r.jsonl", [{"image": None, "text": "x"}, {"image": "a.png", "text": ""}])
    records = read_records(path, label_fields=[])
    assert records[0].image is None and records[1].text is None


def test_csv_without_image_column_and_short_rows(write_csv):
    path = write_csv("r.csv", [["picture", "text"], ["a.png", "x"]])
    assert _error(read_records, path, label_fields=[]).startswith(f"{path}:2: record has no 'image' field")
    path = write_csv("s.csv", [["image", "text", "label"], ["a.png", "x", "cat"], ["b.png", "y"]])
    assert _error(read_records, path, label_fields=["label"]).startswith(f"{path}:3: row has 2 cells")


def test_unknown_extension(tmp_path):
    path = tmp_path / "r.parquet"
    path.write_text("x")
    assert "unknown records format" in _error(read_records, path, label_fields=[])


def _records(n: int, images: int | None = None) -> list[Record]:
    return [Record(f"/img/{i % (images or n)}.png", f"t{i}", {}, f"f:{i + 1}") for i in range(n)]


def test_split_records_is_seeded_and_disjoint():
    records = _records(100)
    a = split_records(records, 0.2, 0.1, seed=3)
    b = split_records(records, 0.2, 0.1, seed=3)
    c = split_records(records, 0.2, 0.1, seed=4)
    assert {k: len(v) for k, v in a.items()} == {"train": 70, "val": 20, "test": 10}
    assert a == b and a["val"] != c["val"]
    sources = [r.source for split in a.values() for r in split]
    assert sorted(sources) == sorted(r.source for r in records)
    assert all(r.split == name for name, split in a.items() for r in split)


def test_split_records_keeps_groups_together():
    splits = split_records(_records(90, images=30), 0.2, 0.0, seed=0, group_by="image")
    train, val = ({r.image for r in splits[k]} for k in ("train", "val"))
    assert len(val) == 6 and not train & val and len(splits["val"]) == 18


def test_split_records_rejects_bad_fractions():
    with pytest.raises(ValueError):
        split_records(_records(10), 0.6, 0.5, seed=0)


def test_load_record_splits_by_split_field(write_jsonl):
    rows = [
        {"image": f"{i}.png", "text": "x", "split": s} for i, s in enumerate(["train", "Validation", "test", "val"])
    ]
    splits = load_record_splits(path=write_jsonl("r.jsonl", rows), label_fields=[])
    assert {k: [os.path.basename(r.image) for r in v] for k, v in splits.items()} == {
        "train": ["0.png"],
        "val": ["1.png", "3.png"],
        "test": ["2.png"],
    }
    assert splits["val"][0].split == "val"


def test_load_record_splits_rejects_unknown_or_partial_split_values(write_jsonl):
    path = write_jsonl(
        "r.jsonl", [{"image": "a.png", "text": "x", "split": "train"}, {"image": "b", "text": "y", "split": "holdout"}]
    )
    assert _error(load_record_splits, path=path, label_fields=[]).startswith(f"{path}:2: unknown 'split' value")
    path = write_jsonl("s.jsonl", [{"image": "a.png", "text": "x", "split": "train"}, {"image": "b", "text": "y"}])
    assert _error(load_record_splits, path=path, label_fields=[]).startswith(f"{path}:2: no 'split' value")


def test_load_record_splits_carves_val_when_no_record_is_marked_val(write_jsonl):
    rows = [{"image": f"{i}.png", "text": "x", "split": "train" if i < 20 else "test"} for i in range(25)]
    splits = load_record_splits(path=write_jsonl("r.jsonl", rows), label_fields=[], val_fraction=0.1)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [18, 2, 5]


def test_load_record_splits_from_separate_files(write_jsonl, write_csv):
    train = write_jsonl("train.jsonl", [{"image": f"{i}.png", "text": "x", "label": "cat"} for i in range(10)])
    val = write_csv("val.csv", [["image", "text", "label"], ["v.png", "y", "dog"]])
    splits = load_record_splits(train=train, val=val, label_fields=["label"])
    assert [len(splits[k]) for k in ("train", "val", "test")] == [10, 1, 0]
    assert splits["val"][0].split == "val" and splits["val"][0].source == f"{val}:2"
    carved = load_record_splits(train=train, label_fields=["label"], val_fraction=0.2, test_fraction=0.1, seed=1)
    assert [len(carved[k]) for k in ("train", "val", "test")] == [7, 2, 1]
    with pytest.raises(ValueError, match="not both"):
        load_record_splits(path=train, train=train, label_fields=[])


def test_load_record_splits_random_split_is_deterministic(write_jsonl):
    path = write_jsonl("r.jsonl", [{"image": f"{i}.png", "text": "x"} for i in range(50)])
    first = load_record_splits(path=path, label_fields=[], val_fraction=0.2, test_fraction=0.2, seed=7)
    again = load_record_splits(path=path, label_fields=[], val_fraction=0.2, test_fraction=0.2, seed=7)
    other = load_record_splits(path=path, label_fields=[], val_fraction=0.2, test_fraction=0.2, seed=8)
    assert [len(first[k]) for k in ("train", "val", "test")] == [30, 10, 10]
    assert first == again and first["val"] != other["val"]


def test_infer_classes():
    records = [
        Record(None, "x", {"label": "dog", "tags": ["b", "a"]}, "f:1"),
        Record(None, "x", {"label": "cat", "tags": "c|a"}, "f:2"),
        Record(None, "x", {"label": None, "tags": None}, "f:3"),
        Record(None, "x", {"label": " dog ", "tags": "b"}, "f:4"),
    ]
    assert infer_classes(records, "label") == ["cat", "dog"]
    assert infer_classes(records, "tags", multilabel=True) == ["a", "b", "c"]
    assert infer_classes(records, "missing") == []
