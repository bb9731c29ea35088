"""One encoder pass per distinct input in a batch: outputs and gradients equal those of the per-record pass, and
the encoder sees U < B rows.

The expected values come from the same model fed the plain per-record batch (`make_loader(dedupe=False)`, what
mmfuse did before): no code of the deduplicating path is used to compute them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfuse.builders import LoaderOptions, build_model
from mmfuse.data import Record
from mmfuse.encoders.base import UniqueInputs
from mmfuse.train.data import Features, make_loader
from tiny import tiny_model

N_IMAGES, PER_IMAGE = 5, 4
TEXTS = ["what colour is it?", "is it dark?", "what shape?"]


def shared_records(root: Path, missing_image: tuple[int, ...] = ()) -> list[Record]:
    """N_IMAGES * PER_IMAGE records; record i shows image i // PER_IMAGE (records of an image are not adjacent)."""
    rng = np.random.default_rng(0)
    paths = []
    for k in range(N_IMAGES):
        arr = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        paths.append(root / f"{k}.png")
        Image.fromarray(arr).save(paths[-1])
    records = []
    order = rng.permutation(N_IMAGES * PER_IMAGE)
    for i in order.tolist():
        image = None if i in missing_image else str(paths[i // PER_IMAGE])
        records.append(Record({"image": image, "text": TEXTS[i % 3]}, {"color": "ab"[i % 2]}, f"r:{i}"))
    return records


def tiny_trainable_model(**image: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {
        "model": tiny_model("concat", freeze=False),
        "tasks": {"color": {"kind": "multiclass", "classes": ["a", "b"]}},
    }
    cfg["model"]["encoders"]["image"].update({"image_size": 16, **image})
    return build_model(cfg)


def run_batches(model: torch.nn.Module, records: list[Record], dedupe: bool) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of each batch, the image encoder's rows per batch; gradients accumulate in `model`."""
    rows: list[int] = []
    hook = model.encoders["image"].register_forward_pre_hook(lambda mod, args: rows.append(len(args[0])))
    options = LoaderOptions(eval_batch_size=10, num_workers=0)
    loader = make_loader(model, records, "val", Features(), options, dedupe=dedupe)
    logits = []
    for batch in loader:
        out = model(batch["inputs"], None, batch["absent"] or None)
        loss = model.losses(out.logits, batch["labels"], batch["masks"])["color"]
        loss.backward()
        logits.append(out.logits["color"].detach())
    hook.remove()
    return logits, rows


def distinct_per_batch(records: list[Record], size: int) -> list[int]:
    return [len({r.inputs["image"] for r in records[a : a + size]}) for a in range(0, len(records), size)]


@pytest.mark.parametrize("missing", [(), (1, 2, 13)], ids=["all-present", "some-images-missing"])
def test_dedupe_gives_the_same_outputs_and_gradients_with_fewer_encoder_rows(tmp_path: Path, missing) -> None:
    records = shared_records(tmp_path, missing)
    plain = tiny_trainable_model().eval()  # eval: BatchNorm uses running statistics, no dropout
    deduped = copy.deepcopy(plain)
    want, rows_plain = run_batches(plain, records, dedupe=False)
    got, rows_dedupe = run_batches(deduped, records, dedupe=True)
    assert rows_plain == [10, 10]
    assert rows_dedupe == distinct_per_batch(records, 10)  # None (missing) counts as one placeholder row
    assert sum(rows_dedupe) < sum(rows_plain)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    compared = set()
    for (name, p), q in zip(plain.named_parameters(), deduped.parameters()):
        if p.grad is None:  # e.g. the text model's unused pooler
            assert q.grad is None, name
            continue
        compared.add(name)
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert {f"encoders.image.{n}" for n, _ in plain.encoders["image"].named_parameters()} <= compared
    assert any(n.startswith("encoders.text.") for n in compared)


def test_missing_inputs_keep_zero_features_under_dedupe(tmp_path: Path) -> None:
    records = shared_records(tmp_path, missing_image=(0, 5, 7))
    model = tiny_trainable_model().eval()
    loader = make_loader(model, records, "val", Features(), LoaderOptions(eval_batch_size=20, num_workers=0))
    batch = next(iter(loader))
    assert isinstance(batch["inputs"]["image"], UniqueInputs)
    absent = batch["absent"]["image"]
    assert absent.sum() == 3
    feats = model.encode(batch["inputs"], None, batch["absent"])["image"]
    assert feats.pooled.shape[0] == 20
    assert (feats.pooled[absent] == 0).all() and (feats.pooled[~absent].abs().sum(1) > 0).all()
    assert feats.present.tolist() == (~absent).tolist()


def test_text_is_deduplicated_too_and_a_batch_without_repeats_stays_plain(tmp_path: Path) -> None:
    records = shared_records(tmp_path)
    model = tiny_trainable_model()
    options = LoaderOptions(eval_batch_size=20, num_workers=0)
    batch = next(iter(make_loader(model, records, "val", Features(), options)))
    plain = next(iter(make_loader(model, records, "val", Features(), options, dedupe=False)))
    text = batch["inputs"]["text"]
    assert isinstance(text, UniqueInputs) and text.unique["input_ids"].shape[0] == len(TEXTS)
    for key, value in plain["inputs"]["text"].items():  # each record's row is its own text
        assert torch.equal(text.unique[key][text.index], value), key
    seen_images, seen_texts, distinct = set(), set(), []
    for r in records:
        if r.inputs["image"] not in seen_images and r.inputs["text"] not in seen_texts:
            seen_images.add(r.inputs["image"]), seen_texts.add(r.inputs["text"]), distinct.append(r)
    one = next(iter(make_loader(model, distinct, "val", Features(), options)))
    assert len(distinct) >= 2 and isinstance(one["inputs"]["image"], torch.Tensor)  # U == B: the plain batch
    assert isinstance(one["inputs"]["text"], dict)


def test_augmented_inputs_are_not_deduplicated_in_training(tmp_path: Path) -> None:
    records = shared_records(tmp_path)
    model = tiny_trainable_model(augment=True)  # each record must get its own random view
    options = LoaderOptions(batch_size=20, num_workers=0, bucket_by_length=False)
    batch = next(iter(make_loader(model, records, "train", Features(), options)))
    assert isinstance(batch["inputs"]["image"], torch.Tensor) and batch["inputs"]["image"].shape[0] == 20
    assert isinstance(batch["inputs"]["text"], UniqueInputs)
