"""The frozen (cached-feature) path: whole batches by index, the same batches as the per-record path;
progress as one line per epoch when stderr is not a terminal."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mmfuse.config import parse_config
from mmfuse.data.collate import Collator
from mmfuse.data.dataset import MultiModalDataset
from mmfuse.data.sampling import EpochRandomSampler
from mmfuse.train.data import CachedCollator, CachedRows, make_loader
from mmfuse.train.run import EpochLineProgress, Run, train
from tiny import run_config, write_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fast")
    cfg = parse_config(run_config(write_dataset(root, n=48)))
    run = Run(cfg)
    return run, run.prepare()


def _per_record_loader(run: Run, feats, split: str) -> DataLoader:
    """The per-record path (Dataset.__getitem__ + Collator + CachedCollator), as before the fast path."""
    records = run.splits[split]
    dataset = MultiModalDataset(records, run.model.tasks, {}, train=split == "train")
    collate = CachedCollator(Collator({}, run.model.tasks), feats.tables, feats.rows[split])
    train = split == "train"
    sampler = EpochRandomSampler(records, run.loader_options.seed) if train else None
    size = run.loader_options.batch_size if train else run.loader_options.eval_batch_size
    return DataLoader(dataset, batch_size=size, sampler=sampler, collate_fn=collate)


def _flat(loader) -> list[dict]:
    """One pass of batches: the training split's come in lists of `train.steps_per_call` (auto: 4)."""
    return [b for item in loader for b in (item if isinstance(item, list) else [item])]


@pytest.mark.parametrize("split", ["train", "val"])
def test_cached_loader_gives_the_same_batches_as_the_per_record_path(prepared, split: str) -> None:
    run, feats = prepared
    fast = make_loader(run.model, run.splits[split], split, feats, run.loader_options)
    assert isinstance(fast.dataset, CachedRows)
    slow = _per_record_loader(run, feats, split)
    for epoch in (0, 3):
        for loader in (fast, slow):
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
        pairs = list(zip(_flat(fast), slow, strict=True))
        assert pairs
        for a, b in pairs:
            assert torch.equal(a["index"], b["index"])
            for t in run.model.tasks:
                assert torch.equal(a["masks"][t], b["masks"][t])
                m = b["masks"][t]
                assert torch.equal(a["labels"][t][m], b["labels"][t][m])  # unlabelled rows: any filler
            for m in feats.tables:
                assert torch.equal(a["features"][m].pooled, b["features"][m].pooled)


def test_train_order_depends_on_epoch_and_seed_only(prepared) -> None:
    run, feats = prepared
    loader = make_loader(run.model, run.splits["train"], "train", feats, run.loader_options)
    loader.sampler.set_epoch(1)
    first = torch.cat([b["index"] for b in _flat(loader)])
    loader.sampler.set_epoch(2)
    other = torch.cat([b["index"] for b in _flat(loader)])
    loader.sampler.set_epoch(1)
    again = torch.cat([b["index"] for b in _flat(loader)])
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert sorted(first.tolist()) == list(range(len(run.splits["train"])))  # every record once


def test_without_a_terminal_progress_is_one_line_per_epoch(tmp_path: Path) -> None:
    cfg = parse_config(
        run_config(write_dataset(tmp_path / "data", n=40), max_epochs=3, progress_bar=True, log_every_n_steps=1)
    )
    stream = io.StringIO()  # not a terminal
    handler = logging.StreamHandler(stream)
    lib = logging.getLogger("mmfuse")
    lib.addHandler(handler)
    old_level = lib.level
    lib.setLevel(logging.INFO)
    try:
        train(cfg, tmp_path / "run")
    finally:
        lib.removeHandler(handler)
        lib.setLevel(old_level)
    lines = [ln for ln in stream.getvalue().splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("train/loss" in ln and "val/color/accuracy" in ln for ln in lines)
    assert "\r" not in stream.getvalue()


def test_the_line_progress_is_chosen_only_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.callbacks import TQDMProgressBar

    from mmfuse.train import run as run_mod

    monkeypatch.setattr(run_mod.sys, "stderr", io.StringIO())
    assert isinstance(run_mod.progress_callback(), EpochLineProgress)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(run_mod.sys, "stderr", Tty())
    assert isinstance(run_mod.progress_callback(), TQDMProgressBar)


def test_the_order_is_drawn_after_set_epoch(prepared) -> None:
    """Lightning creates the epoch's iterator before calling set_epoch (on resume that is the order that counts)."""
    run, feats = prepared
    loader = make_loader(run.model, run.splits["train"], "train", feats, run.loader_options)
    it = iter(loader)
    loader.sampler.set_epoch(2)
    g = torch.Generator().manual_seed(run.loader_options.seed * 100_003 + 2)
    expected = torch.randperm(len(run.splits["train"]), generator=g)[: run.loader_options.batch_size]
    first = next(it)
    assert torch.equal((first[0] if isinstance(first, list) else first)["index"], expected)
