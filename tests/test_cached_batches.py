"""The training batches of an all-cached split without a DataLoader (`CachedBatches`): the same batches, in the same
order of (seed, epoch), on one process and on each DDP rank, as the DataLoader they replace; Lightning sets their epoch;
a model trained on them ends with the same weights as one trained on the DataLoader."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmfuse.config import parse_config
from mmfuse.data import sampling
from mmfuse.data.sampling import EpochDistributedSampler, EpochRandomSampler, epoch_generator
from mmfuse.train.data import CachedBatches, IndexBatchSampler, make_loader
from mmfuse.train.run import Run
from tiny import run_config, write_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Any]:
    run = Run(parse_config(run_config(write_dataset(tmp_path_factory.mktemp("cached-batches"), n=60))))
    return run, run.prepare()


def _train_loader(run: Run, feats: Any, seed: int | None = None, distributed: bool = False) -> CachedBatches:
    options = dataclasses.replace(run.loader_options, seed=run.loader_options.seed if seed is None else seed)
    loader = make_loader(run.model, run.splits["train"], "train", feats, options, distributed)
    assert isinstance(loader, CachedBatches)
    return loader


def _batches(loader: CachedBatches) -> list[dict[str, Any]]:
    """The batches of one pass, out of their lists (`steps_per_call` > 1: lists of that many, the last shorter)."""
    items = list(loader)
    if loader.steps_per_call == 1:
        return items
    assert all(type(x) is list for x in items) and all(len(x) == loader.steps_per_call for x in items[:-1])
    return [b for group in items for b in group]


def _epoch(loader: CachedBatches, epoch: int) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch)
    return [b["index"] for b in _batches(loader)]


def test_each_epoch_sees_every_record_once_in_an_order_of_seed_and_epoch(prepared) -> None:
    run, feats = prepared
    n, size = len(run.splits["train"]), run.loader_options.batch_size
    loader = _train_loader(run, feats)
    orders = {e: torch.cat(_epoch(loader, e)) for e in (0, 1, 2)}
    for e, order in orders.items():
        assert sorted(order.tolist()) == list(range(n))  # every record once
        expected = torch.randperm(n, generator=epoch_generator(run.loader_options.seed, e))
        assert torch.equal(order, expected)  # the documented permutation of (seed, epoch)
        assert torch.equal(torch.cat(_epoch(loader, e)), order)  # a second pass of the epoch repeats it
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    assert not torch.equal(torch.cat(_epoch(_train_loader(run, feats, seed=5), 1)), orders[1])
    assert loader.steps == len(_epoch(loader, 0)) == -(-n // size)
    assert loader.steps_per_call == 4 and len(loader) == -(-loader.steps // 4)  # auto: 4 steps a Lightning step


def test_the_batches_are_those_of_the_dataloader_they_replace(prepared) -> None:
    run, feats = prepared
    loader = _train_loader(run, feats)
    rows = loader.dataset
    before = DataLoader(  # what cached_loader returned for the training split until now
        rows,
        sampler=IndexBatchSampler(len(rows), run.loader_options.batch_size, True, run.loader_options.seed),
        batch_size=None,
        collate_fn=rows.collate,
    )
    for epoch in (0, 3):
        before.sampler.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        pairs = list(zip(_batches(loader), before, strict=True))
        for a, b in pairs:
            assert torch.equal(a["index"], b["index"])
            for t in run.model.tasks:
                assert torch.equal(a["labels"][t], b["labels"][t]) and torch.equal(a["masks"][t], b["masks"][t])
            for m in feats.tables:
                assert torch.equal(a["features"][m].pooled, b["features"][m].pooled)


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    monkeypatch.setattr(sampling.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sampling.dist, "get_world_size", lambda *a: world)
    monkeypatch.setattr(sampling.dist, "get_rank", lambda *a: rank)


@pytest.mark.parametrize(("n", "world", "size"), [(60, 2, 8), (23, 3, 4), (5, 4, 2), (2, 3, 1)])
def test_each_rank_gets_the_batches_of_the_distributed_sampler(
    monkeypatch: pytest.MonkeyPatch, n: int, world: int, size: int
) -> None:
    seen = []
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        batches = IndexBatchSampler(n, size, shuffle=True, seed=3, distributed=True)
        per_record = EpochDistributedSampler(range(n), seed=3)  # the per-record loader's sampler under DDP
        batches.set_epoch(2)
        per_record.set_epoch(2)
        got = [b.tolist() for b in batches]
        assert got == [b.tolist() for b in DataLoader(range(n), batch_size=size, sampler=per_record)]
        assert len(batches) == len(got) == -(-len(per_record) // size)  # the same number of steps on every rank
        seen.append(torch.tensor([i for b in got for i in b]))
    # rank r holds positions r, r + W, ... of the epoch's permutation, padded to a multiple of W from its start
    order = torch.randperm(n, generator=epoch_generator(3, 2))
    total = -(-n // world) * world
    padded = order.repeat(-(-total // n))[:total]
    assert all(torch.equal(seen[r], padded[r::world]) for r in range(world))
    assert sorted(torch.cat(seen).tolist()) == sorted(padded.tolist())  # each record once, the padding added
    if n % world == 0:
        assert len(set(torch.cat(seen).tolist())) == n  # disjoint and complete


def test_distributed_batches_are_shuffled_training_batches() -> None:
    with pytest.raises(ValueError, match="shuffle=True"):
        IndexBatchSampler(10, 2, shuffle=False, distributed=True)


class _Record(L.LightningModule):
    """Records the index of every training batch, per epoch (no optimiser)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.seen: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch: dict[str, Any] | list[dict[str, Any]], batch_idx: int) -> None:
        for one in batch if isinstance(batch, list) else [batch]:
            self.seen.setdefault(self.current_epoch, []).append(one["index"])

    def configure_optimizers(self) -> None:
        return None


def _trainer(tmp_path: Any, epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, deterministic=True,
    )  # fmt: skip


def test_lightning_sets_the_epoch_of_the_batches(prepared, tmp_path) -> None:
    run, feats = prepared
    module = _Record()
    _trainer(tmp_path, 3).fit(module, _train_loader(run, feats))
    n = len(run.splits["train"])
    for epoch in (0, 1, 2):
        expected = EpochRandomSampler(range(n), run.loader_options.seed)
        expected.set_epoch(epoch)
        assert torch.cat(module.seen[epoch]).tolist() == list(expected)


@pytest.mark.parametrize("random_steps", [False, True])
def test_training_on_them_gives_the_weights_of_the_dataloader(tmp_path, random_steps: bool) -> None:
    """The run's module (weighting, clipping, schedule) trained 2 epochs on each source from one initialisation; with
    `random_steps`, PCGrad (a random task order each step) and OGM-GE (Gaussian noise on the gradients): the random
    numbers of the steps stay those of the DataLoader path too."""
    raw = run_config(write_dataset(tmp_path / "data", n=40))
    if random_steps:
        raw["model"]["fusion"] = {"name": "sum", "output_dim": 16}
        raw["train"].update(weighting={"name": "pcgrad"}, balance={"name": "ogm_ge"})
    run = Run(parse_config(raw))
    loader = _train_loader(run, run.prepare())
    rows, start, balancer = loader.dataset, copy.deepcopy(run.model.state_dict()), copy.deepcopy(run.balancer)
    old = DataLoader(  # what cached_loader returned for the training split until now
        rows,
        sampler=IndexBatchSampler(len(rows), run.loader_options.batch_size, True, run.loader_options.seed),
        batch_size=None,
        collate_fn=rows.collate,
    )
    weights = []
    for i, source in enumerate((loader, old)):
        run.model.load_state_dict(start)
        run.balancer = copy.deepcopy(balancer)  # it keeps a state across steps
        L.seed_everything(0, verbose=False)
        _trainer(tmp_path / str(i), 2).fit(run.module(), source)
        weights.append({k: v.clone() for k, v in run.model.state_dict().items()})
    changed = [k for k in weights[0] if not torch.equal(weights[0][k], start[k])]
    assert changed  # it trained
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


class _StepLosses(L.Callback):
    """Each step's (T,) task losses and masks (every step of a list of batches), and the epoch means the weighting is
    handed."""

    def __init__(self) -> None:
        self.steps: dict[int, list[tuple[list[float], list[bool]]]] = {}
        self.means: dict[int, dict[str, float]] = {}

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        step = module._train_step

        def spy_step(batch: dict[str, Any], batch_idx: int) -> None:
            step(batch, batch_idx)
            labelled = [bool(m.any()) for m in batch["masks"].values()]
            self.steps.setdefault(module.current_epoch, []).append((module._step_losses.tolist(), labelled))

        module._train_step = spy_step
        hook = module.weighting.on_epoch_end

        def spy(epoch: int, means: dict[str, float]) -> None:
            self.means[epoch] = dict(means)
            hook(epoch, means)

        module.weighting.on_epoch_end = spy


@pytest.mark.parametrize("weighting", ["dwa", "equal"])
def test_the_epoch_mean_losses_reach_a_weighting_that_reads_them(tmp_path, weighting: str) -> None:
    """DWA gets each task's mean step loss over the steps where it has labels; a weighting whose `on_epoch_end` is
    `Weighting`'s no-op costs no step an epoch sum."""
    raw = run_config(write_dataset(tmp_path / "data", n=40), max_epochs=3)
    raw["train"]["weighting"] = {"name": weighting}
    run = Run(parse_config(raw))
    loader = make_loader(run.model, run.splits["train"], "train", run.prepare(), run.loader_options)
    spy, module = _StepLosses(), run.module()
    trainer = _trainer(tmp_path / "run", 3)
    trainer.callbacks.append(spy)
    trainer.fit(module, loader)
    if weighting == "equal":
        assert not module._sums_epoch_losses and module._epoch_losses is None and spy.means == {0: {}, 1: {}, 2: {}}
        return
    tasks = list(run.model.tasks)
    for epoch, steps in spy.steps.items():
        expected = {}
        for i, task in enumerate(tasks):
            values = [losses[i] for losses, labelled in steps if labelled[i]]
            if values:
                expected[task] = sum(values) / len(values)
        assert spy.means[epoch] == pytest.approx(expected, rel=1e-12)
    assert set(spy.means) == {0, 1, 2}
    assert all(len(steps) == loader.steps for steps in spy.steps.values()) and len(loader) < loader.steps
