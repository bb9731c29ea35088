"""Tests of mmfuse.data.records: reading JSONL/CSV through the encoders, one-line errors, confinement, splits."""

from __future__ import annotations

import json
import os

import pytest

from mmfuse.data import DataError, Record, load_record_splits, read_records, shared_inputs, split_records
from mmfuse.data.records import default_group_by


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_jsonl_reads_records_with_the_file_folder_as_root(tmp_path, write_jsonl, make_schema):
    rows = [
        {"image": "img/a.png", "text": "a cat", "label": "cat", "flag": 1, "tags": ["a", "b"], "score": 0.5},
        "",  # blank lines are skipped but counted
        {"image": "b.png", "text": " a dog ", "label": "", "flag": None, "score": 2},
    ]
    path = write_jsonl("sub/train.jsonl", rows)
    records = read_records(path, make_schema())
    assert [r.inputs["image"] for r in records] == [str(tmp_path / "sub/img/a.png"), str(tmp_path / "sub/b.png")]
    assert records[0].labels == {"label": "cat", "flag": 1, "tags": ["a", "b"], "score": 0.5}
    # "" and null are missing, an absent key is missing too: never an error
    assert records[1].labels == {"label": None, "flag": None, "tags": None, "score": 2}
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]
    assert records[1].inputs["text"] == "a dog" and records[0].split is None


def test_a_utf8_bom_is_accepted(tmp_path, make_schema):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": "a.png", "text": "x"}).encode() + b"\n")
    assert read_records(path, make_schema(labels=[]))[0].inputs["text"] == "x"


def test_fields_are_configured_per_modality(write_jsonl, make_schema):
    path = write_jsonl("r.jsonl", [{"picture": "a.png", "caption": "t", "y": "cat"}])
    schema = make_schema(labels={"label": "y"}, fields={"image": "picture", "text": "caption"})
    record = read_records(path, schema)[0]
    assert record.labels == {"label": "cat"} and record.inputs["text"] == "t"
    assert record.inputs["image"].endswith("a.png")


@pytest.mark.parametrize("value", ["../x.png", "../../etc/passwd", "/etc/passwd", "~/x.png", "a/../../x.png"])
def test_file_paths_are_confined_to_the_data_folder(tmp_path, write_jsonl, make_schema, value):
    path = write_jsonl("data/r.jsonl", [{"image": "a.png", "text": "t"}, {"image": value, "text": "t"}])
    message = _error(read_records, path, make_schema(labels=[]))
    assert message.startswith(f"{path}:2: image: image path") and "outside the data folder" in message
    assert "data.allow_outside_root" in message
    errors: list = []
    assert len(read_records(path, make_schema(labels=[]), errors=errors)) == 1 and len(errors) == 1
    # the explicit switch allows it (a path inside the folder stays fine either way)
    record = read_records(path, make_schema(labels=[]), allow_outside_root=True)[1]
    expected = os.path.normpath(os.path.join(tmp_path / "data", os.path.expanduser(value)))
    assert record.inputs["image"] == expected


def test_explicit_root(tmp_path, write_jsonl, make_schema):
    path = write_jsonl("r.jsonl", [{"image": "a.png", "text": "t"}, {"image": "sub/./b.png", "text": "t"}])
    records = read_records(path, make_schema(labels=[]), root=tmp_path / "images")
    assert [r.inputs["image"] for r in records] == [str(tmp_path / "images/a.png"), str(tmp_path / "images/sub/b.png")]


def test_overlong_image_path_is_one_line(write_jsonl, make_schema):
    path = write_jsonl("r.jsonl", [{"image": "a" * 300 + ".png", "text": "t"}])
    assert "too long" in _error(read_records, path, make_schema(labels=[]))


def test_lone_surrogate_in_text_is_one_line(tmp_path, make_schema):
    path = tmp_path / "r.jsonl"
    path.write_text('{"image": "a.png", "text": "bad \\ud800 text"}\n')
    message = _error(read_records, path, make_schema(labels=[]))
    assert message.startswith(f"{path}:1: text: text has an invalid character") and "surrogate" in message


def test_csv_reads_records_and_counts_the_header_as_line_1(tmp_path, write_csv, make_schema):
    rows = [
        ["image", "text", "label", "score", "split"],
        ["a.png", "a cat", "cat", "1.5", "train"],
        ["b.png", "two\nlines", "", " ", "test"],
        ["c.png", "a fox", "fox", "3", ""],
    ]
    path = write_csv("r.csv", rows)
    records = read_records(path, make_schema(labels=["label", "score"]), root=tmp_path / "imgs")
    assert records[0].inputs["image"] == str(tmp_path / "imgs/a.png")
    assert records[0].labels == {"label": "cat", "score": "1.5"}
    assert records[1].labels == {"label": None, "score": None}
    assert records[1].inputs["text"] == "two\nlines"
    # the quoted two-line cell takes lines 3-4, so the next row starts on line 5
    assert [r.source for r in records] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert [r.split for r in records] == ["train", "test", None]


def test_a_csv_without_a_task_label_column_is_an_error(write_csv, make_schema):
    path = write_csv("r.csv", [["image", "text", "label"], ["a.png", "x", "cat"]])
    message = _error(read_records, path, make_schema(labels=["label", "score"]))
    assert message.startswith(f"{path}: no column 'score' for the labels of task 'score'")
    assert "tasks.score.field" in message


def test_a_jsonl_file_where_no_record_has_a_label_field_is_an_error(write_jsonl, make_schema):
    path = write_jsonl("r.jsonl", [{"image": "a.png", "text": "x", "label": "cat"}, {"image": "a.png", "text": "y"}])
    assert "no field 'flag'" in _error(read_records, path, make_schema(labels=["label", "flag"]))
    assert len(read_records(path, make_schema(labels=["label"]))) == 2  # one record without it: a missing label


def test_json_array_file(tmp_path, make_schema):
    path = tmp_path / "r.json"
    path.write_text('[{"image": "a.png", "text": "x", "label": "cat"}, {"image": "b.png", "text": "y"}]')
    records = read_records(path, make_schema(labels=["label"]))
    assert [r.labels["label"] for r in records] == ["cat", None]
    assert records[1].source == f"{path}:2"


def test_missing_file_is_a_data_error(tmp_path, make_schema):
    message = _error(read_records, tmp_path / "nope.jsonl", make_schema())
    assert str(tmp_path / "nope.jsonl") in message and "not found" in message


def test_bad_json_line_names_file_and_line(write_jsonl, make_schema):
    rows = [{"image": "a.png", "text": "x"}, {"image": "b.png", "text": "y"}, '{"image": "c.png",']
    path = write_jsonl("r.jsonl", rows)
    assert _error(read_records, path, make_schema(labels=[])).startswith(f"{path}:3: bad JSON")


@pytest.mark.parametrize(
    ("line", "words"),
    [("[" * 100_000 + "]" * 100_000, "nested too deeply"), ('{"score": ' + "9" * 5000 + "}", "bad JSON")],
)
def test_pathological_json_is_one_line(write_jsonl, make_schema, line, words):
    path = write_jsonl("r.jsonl", [{"image": "a.png", "text": "x"}, line])
    message = _error(read_records, path, make_schema(labels=[]))
    assert message.startswith(f"{path}:2: ") and words in message


def test_json_line_that_is_not_an_object(write_jsonl, make_schema):
    path = write_jsonl("r.jsonl", [{"image": "a.png", "text": "x"}, "[1, 2]"])
    assert _error(read_records, path, make_schema(labels=[])).startswith(f"{path}:2: a record must be a JSON object")


@pytest.mark.parametrize("field", ["image", "text"])
def test_record_without_the_image_or_text_field(write_jsonl, make_schema, field):
    row = {"image": "b.png", "text": "y"}
    del row[field]
    path = write_jsonl("r.jsonl", [{"image": "a.png", "text": "x"}, row])
    assert _error(read_records, path, make_schema(labels=[])).startswith(f"{path}:2: record has no {field!r} field")


def test_a_file_without_a_modality_field_names_the_encoder_key(write_jsonl, write_csv, make_schema):
    path = write_jsonl("r.jsonl", [{"imgae": "a.png", "text": "x"}])
    message = _error(read_records, path, make_schema(labels=[]))
    assert message.startswith(f"{path}: no field 'image' for the 'image' input") and "imgae" in message
    assert "model.encoders.image.field" in message
    path = write_csv("r.csv", [["picture", "text"], ["a.png", "x"]])
    assert _error(read_records, path, make_schema(labels=[])).startswith(f"{path}: no column 'image'")


def test_optional_modality_fields_for_prediction_inputs(write_jsonl, make_schema):
    path = write_jsonl("r.jsonl", [{"image": "a.png"}, {"text": "only text"}])
    records = read_records(path, make_schema(labels=[]), required=False)
    assert records[0].inputs["text"] is None and records[1].inputs == {"image": None, "text": "only text"}


def test_null_image_or_text_is_a_missing_input_not_a_read_error(write_jsonl, make_schema):
    path = write_jsonl("r.jsonl", [{"image": None, "text": "x"}, {"image": "a.png", "text": ""}])
    records = read_records(path, make_schema(labels=[]))
    assert records[0].inputs["image"] is None and records[1].inputs["text"] is None


def test_wrong_type_of_input_names_the_field(write_jsonl, make_schema):
    path = write_jsonl("r.jsonl", [{"image": 5, "text": "x"}])
    assert "field 'image' must be an image path, got int" in _error(read_records, path, make_schema(labels=[]))


def test_short_csv_rows(write_csv, make_schema):
    path = write_csv("s.csv", [["image", "text", "label"], ["a.png", "x", "cat"], ["b.png", "y"]])
    assert _error(read_records, path, make_schema(labels=["label"])).startswith(f"{path}:3: row has 2 cells")


def test_unknown_extension(tmp_path, make_schema):
    path = tmp_path / "r.parquet"
    path.write_text("x")
    assert "unknown records format" in _error(read_records, path, make_schema())


# ---------------------------------------------------------------------- splits
def _records(n: int, images: int | None = None) -> list[Record]:
    return [Record({"image": f"/img/{i % (images or n)}.png", "text": f"t{i}"}, {}, f"f:{i + 1}") for i in range(n)]


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


def test_split_records_keeps_groups_of_a_modality_together():
    splits = split_records(_records(90, images=30), 0.2, 0.0, seed=0, group_by="image")
    train, val = ({r.inputs["image"] for r in splits[k]} for k in ("train", "val"))
    assert len(val) == 6 and not train & val and len(splits["val"]) == 18


def test_split_records_rejects_bad_fractions():
    with pytest.raises(ValueError):
        split_records(_records(10), 0.6, 0.5, seed=0)


def test_default_group_by_is_the_repeated_file_input(encoders):
    assert default_group_by(_records(30, images=10), encoders) == "image"
    assert default_group_by(_records(30), encoders) is None  # no image repeats; texts never group by default


def test_random_split_of_a_file_keeps_each_image_in_one_split(write_jsonl, make_schema):
    rows = [{"image": f"{i % 20}.png", "text": f"question {i}", "label": "cat"} for i in range(200)]
    path = write_jsonl("r.jsonl", rows)
    splits = load_record_splits(make_schema(labels=["label"]), path=path, val_fraction=0.2, test_fraction=0.2)
    images = {k: {r.inputs["image"] for r in v} for k, v in splits.items()}
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"] and [len(images[k]) for k in ("train", "val", "test")] == [12, 4, 4]
    assert shared_inputs(splits, ["image"]) == []


def test_group_by_a_field(write_jsonl, make_schema):
    rows = [{"image": f"{i}.png", "text": "x", "patient": f"p{i % 5}"} for i in range(50)]
    path = write_jsonl("r.jsonl", rows)
    splits = load_record_splits(make_schema(labels=[], group_by="patient"), path=path, val_fraction=0.2)
    groups = {k: {r.group for r in v} for k, v in splits.items()}
    assert len(groups["val"]) == 1 and not groups["train"] & groups["val"] and len(splits["val"]) == 10


def test_shared_inputs_warns_about_test_records_seen_in_training(write_jsonl, make_schema):
    train = write_jsonl("train.jsonl", [{"image": f"{i}.png", "text": "x"} for i in range(10)])
    test = write_jsonl("test.jsonl", [{"image": f"{i}.png", "text": "x"} for i in range(8, 14)])
    splits = load_record_splits(make_schema(labels=[]), train=train, test=test, val_fraction=0.0)
    notes = shared_inputs(splits, ["image"])
    assert len(notes) == 1 and notes[0].startswith("2 of 6 test records share their 'image' input")


def test_load_record_splits_by_split_field(write_jsonl, make_schema):
    rows = [
        {"image": f"{i}.png", "text": "x", "split": s} for i, s in enumerate(["train", "Validation", "test", "val"])
    ]
    splits = load_record_splits(make_schema(labels=[]), path=write_jsonl("r.jsonl", rows))
    assert {k: [os.path.basename(r.inputs["image"]) for r in v] for k, v in splits.items()} == {
        "train": ["0.png"],
        "val": ["1.png", "3.png"],
        "test": ["2.png"],
    }
    assert splits["val"][0].split == "val"


def test_load_record_splits_rejects_unknown_or_partial_split_values(write_jsonl, make_schema):
    rows = [{"image": "a.png", "text": "x", "split": "train"}, {"image": "b", "text": "y", "split": "holdout"}]
    path = write_jsonl("r.jsonl", rows)
    assert _error(load_record_splits, make_schema(labels=[]), path=path).startswith(f"{path}:2: unknown 'split' value")
    path = write_jsonl("s.jsonl", [{"image": "a.png", "text": "x", "split": "train"}, {"image": "b", "text": "y"}])
    assert _error(load_record_splits, make_schema(labels=[]), path=path).startswith(f"{path}:2: no 'split' value")


def test_load_record_splits_carves_val_when_no_record_is_marked_val(write_jsonl, make_schema):
    rows = [{"image": f"{i}.png", "text": "x", "split": "train" if i < 20 else "test"} for i in range(25)]
    splits = load_record_splits(make_schema(labels=[]), path=write_jsonl("r.jsonl", rows), val_fraction=0.1)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [18, 2, 5]


def test_load_record_splits_from_separate_files(write_jsonl, write_csv, make_schema):
    schema = make_schema(labels=["label"])
    train = write_jsonl("train.jsonl", [{"image": f"{i}.png", "text": "x", "label": "cat"} for i in range(10)])
    val = write_csv("val.csv", [["image", "text", "label"], ["v.png", "y", "dog"]])
    splits = load_record_splits(schema, train=train, val=val)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [10, 1, 0]
    assert splits["val"][0].split == "val" and splits["val"][0].source == f"{val}:2"
    carved = load_record_splits(schema, train=train, val_fraction=0.2, test_fraction=0.1, seed=1)
    assert [len(carved[k]) for k in ("train", "val", "test")] == [7, 2, 1]
    with pytest.raises(ValueError, match="not both"):
        load_record_splits(schema, path=train, train=train)


def test_an_empty_val_file_is_an_error(write_jsonl, tmp_path, make_schema):
    train = write_jsonl("train.jsonl", [{"image": f"{i}.png", "text": "x"} for i in range(10)])
    (tmp_path / "val.jsonl").write_text("\n")
    message = _error(load_record_splits, make_schema(labels=[]), train=train, val=tmp_path / "val.jsonl")
    assert message == f"{tmp_path / 'val.jsonl'}: no records (data.val names an empty file)"


def test_load_record_splits_random_split_is_deterministic(write_jsonl, make_schema):
    path = write_jsonl("r.jsonl", [{"image": f"{i}.png", "text": "x"} for i in range(50)])
    schema = make_schema(labels=[])
    first = load_record_splits(schema, path=path, val_fraction=0.2, test_fraction=0.2, seed=7)
    again = load_record_splits(schema, path=path, val_fraction=0.2, test_fraction=0.2, seed=7)
    other = load_record_splits(schema, path=path, val_fraction=0.2, test_fraction=0.2, seed=8)
    assert [len(first[k]) for k in ("train", "val", "test")] == [30, 10, 10]
    assert first == again and first["val"] != other["val"]
