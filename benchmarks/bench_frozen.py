"""1. frozen: training with both encoders frozen, epochs after the first.

mmfuse: the path `train()` takes: `Run.prepare()` (FeatureCache: each distinct image and text encoded once,
stored as safetensors), `make_loader` (CachedCollator gathers the cached rows), `Run.module()`
(MMFuseModule) and mmfuse's own Trainer (`build_trainer`: checkpoint every epoch, CSV + TensorBoard
loggers). Figure: records / wall time of a whole training epoch (start of epoch e to start of epoch
e+1: data, steps, logging, checkpoint), epochs after the first. The one-off feature extraction is
reported apart.

Notebook: the frozen encoders re-run on every step under `torch.no_grad()` on pre-collated batches
(its data loading is not even counted), text padded to 128 (and, for reference, padded per batch).
"""

from __future__ import annotations

import statistics
import time

from common import (
    BATCH,
    Result,
    Row,
    Settings,
    Target,
    apply_trainer_flags,
    collate_batches,
    fmt,
    interleave,
    lightning_callbacks,
    loop_runner,
    mmfuse_trainer,
    model_config,
    notebook_model,
    notebook_step,
    pad_to_max,
    reference,
    side_row,
    tokens_per_batch,
)

TARGET = 100.0


def run(s: Settings) -> Result:
    import torch

    from mmfuse.config import parse_config
    from mmfuse.train.data import make_loader
    from mmfuse.train.run import Run

    epochs = 3 if s.quick else 4
    data = {"limit": 1024} if s.quick else {}
    cfg = parse_config(
        model_config(True, device=s.device, data=data, train={"max_epochs": epochs, "cache_dir": str(s.workdir / "fc")})
    )
    torch.manual_seed(0)
    run_ = Run(cfg)
    run_.splits = {"train": run_.splits["train"]}  # time training epochs only
    t0 = time.perf_counter()
    feats = run_.prepare()
    extract_s = time.perf_counter() - t0
    records = run_.splits["train"]
    loader = make_loader(run_.model, records, "train", feats, run_.loader_options)
    module = run_.module()
    apply_trainer_flags(run_.cfg, s.workdir)

    warmup, steps = 1, s.steps(5, 2)
    nb_records = records[: (warmup + steps) * BATCH]
    dyn = collate_batches(run_.model, nb_records, warmup + steps)
    pad = pad_to_max(dyn, nb_records, run_.model.encoders["text"].tokenizer)
    nb = notebook_model(run_.model).to(s.device)
    notebook = {
        "notebook pad 128": loop_runner(notebook_step(nb, pad, s.device, frozen=True), s.device),
        "notebook dynamic": loop_runner(notebook_step(nb, dyn, s.device, frozen=True), s.device),
    }
    before = interleave(notebook, BATCH, 1, warmup, steps)
    epoch_s, train_only_s = fit_epochs(module, loader, run_.cfg, s)
    after = interleave(notebook, BATCH, 1, warmup, steps)
    nb_m = {k: before[k] for k in notebook}
    for k in notebook:
        nb_m[k].rounds += after[k].rounds
        nb_m[k].cpu_share = (before[k].cpu_share + after[k].cpu_share) / 2

    mm_sps = len(records) / statistics.median(epoch_s)
    base = nb_m["notebook pad 128"].per_second
    ratio = mm_sps / base
    per_epoch_ratios = [len(records) / e / base for e in epoch_s]
    res = Result("frozen")
    res.rows = [
        Row(
            "mmfuse (FeatureCache + CachedCollator + MMFuseModule + Trainer)",
            mm_sps,
            "samples/s",
            f"{fmt(ratio)}x notebook",
            f"{len(records)} records/epoch, {statistics.median(epoch_s):.2f} s/epoch over {len(epoch_s)} epochs",
        ),
        side_row(
            "notebook: frozen encoders re-run, pad 128",
            nb_m["notebook pad 128"],
            f"T={tokens_per_batch(pad):.0f}",
            ref=reference("frozen notebook pad 128", s.device),
        ),
        side_row(
            "notebook: frozen encoders re-run, dynamic padding",
            nb_m["notebook dynamic"],
            f"T={tokens_per_batch(dyn):.1f}",
            f"{fmt(mm_sps / nb_m['notebook dynamic'].per_second)}x below mmfuse",
            ref=reference("frozen notebook dynamic", s.device),
        ),
        Row("mmfuse one-off feature extraction", extract_s, "s", "", f"{len(records)} records, before epoch 1"),
    ]
    res.targets = [
        Target(
            "frozen: mmfuse samples/s >= 100x notebook (pad 128)",
            ratio,
            TARGET,
            ratio >= TARGET,
            (min(per_epoch_ratios), max(per_epoch_ratios)),
        )
    ]
    res.info = {
        "records": len(records),
        "epoch_s": epoch_s,
        "train_part_of_epoch_s": train_only_s,
        "feature_extraction_s": extract_s,
        "notebook_step_s": {k: m.times for k, m in nb_m.items()},
    }
    return res


def fit_epochs(module: object, loader: object, cfg: object, s: Settings) -> tuple[list[float], list[float]]:
    """Fit for cfg.train.max_epochs; returns the whole-epoch times and their training part, first epoch excluded."""
    _, EpochClock = lightning_callbacks()
    clock = EpochClock(s.device)
    trainer = mmfuse_trainer(cfg, s.workdir / "frozen_run", [clock])
    trainer.fit(module, loader)
    whole = [b - a for a, b in zip(clock.starts, clock.starts[1:])]  # the last epoch has no next start: dropped
    return whole[1:], clock.train_only[1 : len(whole)]
