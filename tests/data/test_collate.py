"""Tests of mmfuse.data.collate: dynamic padding with the packaged MiniLM tokenizer, absent flags, labels, masks."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from mmfuse.data import Collator, MultiModalDataset, Record
from mmfuse.data.collate import merge_absent

TEXTS = ["a cat", "is there a small red circle in the picture?", "what colour is the shape on the left?"]


@pytest.fixture(scope="module")
def tokenizer(encoders):
    return encoders["text"].tokenizer


@pytest.fixture
def processors(encoders):
    return encoders


@pytest.fixture
def dataset(make_image, tasks, processors):
    a, b = str(make_image("a.png")), str(make_image("b.png", mode="L"))
    records = [
        Record({"image": a, "text": TEXTS[0]}, {"label": "dog", "flag": "1", "tags": "a|d", "score": 0.25}, "f:1"),
        Record({"image": b, "text": TEXTS[1]}, {"label": None, "flag": "false", "tags": None, "score": 3}, "f:2"),
        Record({"image": a, "text": TEXTS[2]}, {"label": "fox", "flag": None, "tags": ["c"], "score": None}, "f:3"),
    ]
    return MultiModalDataset(records, tasks, processors)


def test_text_is_padded_to_the_longest_item(dataset, processors, tasks, tokenizer):
    batch = Collator(processors, tasks)([dataset[i] for i in range(3)])
    text = batch["inputs"]["text"]
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    assert text["input_ids"].shape == (3, max(lengths))
    assert text["attention_mask"].sum(1).tolist() == lengths
    assert (text["input_ids"][text["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    # a batch of short texts is only as long as its longest text
    short = Collator(processors, tasks)([dataset[0]])
    assert short["inputs"]["text"]["input_ids"].shape == (1, lengths[0])


def test_labels_masks_and_dtypes(dataset, processors, tasks):
    batch = Collator(processors, tasks)([dataset[i] for i in range(3)])
    labels, masks = batch["labels"], batch["masks"]
    assert labels["label"].dtype == torch.long and labels["label"].tolist() == [1, 0, 2]
    assert labels["flag"].dtype == torch.float32 and labels["flag"].tolist() == [1.0, 0.0, 0.0]
    assert labels["score"].dtype == torch.float32 and labels["score"].tolist() == [0.25, 3.0, 0.0]
    assert labels["tags"].dtype == torch.float32 and labels["tags"].shape == (3, 4)
    assert labels["tags"].tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]]
    assert {t: m.tolist() for t, m in masks.items()} == {
        "label": [True, False, True],
        "flag": [True, True, False],
        "tags": [True, False, True],
        "score": [True, True, False],
    }
    assert all(m.dtype == torch.bool for m in masks.values())
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1, 2]
    assert batch["inputs"]["image"].shape == (3, 3, 8, 8)
    assert batch["absent"] == {}


def test_absent_modalities_get_placeholders_and_flags(make_image, tasks, processors, tokenizer):
    image = str(make_image("a.png"))
    records = [
        Record({"image": image, "text": "a cat"}, {}, "f:1"),
        Record({"image": None, "text": "a dog"}, {}, "f:2"),
        Record({"image": image, "text": None}, {}, "f:3"),
    ]
    ds = MultiModalDataset(records, tasks, processors)
    batch = Collator(processors, tasks)([ds[i] for i in range(3)])
    assert batch["absent"]["image"].tolist() == [False, True, False]
    assert batch["absent"]["text"].tolist() == [False, False, True]
    assert batch["absent"]["image"].dtype == torch.bool
    assert batch["inputs"]["image"].shape == (3, 3, 8, 8) and not batch["inputs"]["image"][1].any()
    empty = tokenizer("")["input_ids"]
    assert batch["inputs"]["text"]["input_ids"][2, : len(empty)].tolist() == empty
    assert batch["inputs"]["text"]["attention_mask"][2].sum() == len(empty)
    only_text = Collator(processors, tasks)([ds[1]])  # no image anywhere in the batch
    assert only_text["inputs"]["image"].shape == (1, 3, 8, 8) and not only_text["inputs"]["image"].any()
    assert "text" not in only_text["absent"]


def test_collator_pickles_and_works_in_a_dataloader(dataset, processors, tasks):
    collator = pickle.loads(pickle.dumps(Collator(processors, tasks)))
    loader = DataLoader(dataset, batch_size=2, collate_fn=collator, num_workers=1)
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]
    assert batches[0]["labels"]["tags"].shape == (2, 4)


def test_merge_absent_ors_the_masks_of_one_modality_and_keeps_the_others() -> None:
    a, b = torch.tensor([True, False, False]), torch.tensor([False, False, True])
    text = torch.tensor([False, True, False])
    merged = merge_absent({"image": a}, None, {"image": b, "text": text})
    assert merged["image"].tolist() == [True, False, True] and merged["text"] is text
    assert a.tolist() == [True, False, False]  # the inputs are not changed in place
    assert merge_absent() == {} and merge_absent(None, {}) == {}
