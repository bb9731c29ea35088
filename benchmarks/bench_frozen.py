"""1. frozen: training with both encoders frozen, on features computed once.

Led by the two baselines a skeptic accepts, each a whole training epoch over the same records, batch size and
optimiser (fused AdamW, mmfuse's lr and weight decay), interleaved with mmfuse's epochs in rounds (the order
rotates):

- bare cached loop: a plain PyTorch loop over mmfuse's own cached features, gathered once into contiguous
  (N, D) tensors; the same fusion + head modules (a fresh copy of mmfuse's model each round), masked task
  losses, clipping and schedule as mmfuse's step (`bench_cached.bare_epoch`). mmfuse vs this is the framework's
  cost on this path.
- notebook, features extracted once: the notebook model's frozen encoders run ONCE over every training record
  (batches of 256, text padded per batch, under `no_grad`), then a plain loop trains concat -> Linear -> Linear on
  the precomputed (N, 896) tensor: shuffled batches, cross-entropy, `AdamW(fused=True)`; the extraction is timed
  apart (one-off).
- Lightning floor: the bare loop's step as a LightningModule (`bench_cached.BareStepModule`: manual optimisation,
  `manual_backward`, Lightning's optimizer wrapper) fitted by mmfuse's own Trainer on mmfuse's own loader, so
  that mmfuse vs the bare loop splits into Lightning + Trainer + loader (floor vs bare) and mmfuse's module
  (mmfuse vs floor).
- mmfuse: the path `train()` takes: `Run.prepare()` (FeatureCache: each distinct image and text encoded once,
  stored as safetensors), `make_loader` (`CachedBatches`: whole batches gathered from the cached rows by index, no
  DataLoader), `Run.module()` (MMFuseModule)
  and mmfuse's own Trainer (`build_trainer`: checkpoint, CSV + TensorBoard loggers); one 1-epoch `fit` per round,
  the figure is its training epoch (epoch start to epoch end hooks); the whole `fit` (set-up, checkpoint,
  teardown) is reported beside it.

Every side is timed by the wall clock (the figures and the targets) and by this process's CPU time (beside them:
on a shared machine, time spent waiting for a core is not the code's). The batch size is `common.BATCH` (32).

Context only: the notebook loop that re-runs its frozen encoders on every step under `torch.no_grad()`
(pre-collated batches, text padded to 128, and per batch).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

from common import (
    BATCH,
    TASK,
    Result,
    Row,
    Settings,
    Target,
    apply_trainer_flags,
    collate_batches,
    collate_batches_of,
    fmt,
    interleave,
    lightning_callbacks,
    loop_runner,
    mmfuse_trainer,
    model_config,
    notebook_model,
    notebook_step,
    now,
    pad_to_max,
    reference,
    setup,
    side_row,
    to_device,
    tokens_per_batch,
)

TARGET_NOTEBOOK = 0.5  # issue 13: mmfuse >= 0.5x the notebook that extracts features once
TARGET_BARE = 0.8  # issue 23: at batch 32, mmfuse >= 0.8x the bare loop over the same tensors


def run(s: Settings) -> Result:
    import torch

    from mmfuse.config import parse_config
    from mmfuse.train.data import make_loader
    from mmfuse.train.run import Run

    from bench_cached import BareStepModule, bare_epoch

    limit = s.limit or (1024 if s.quick else None)
    data = {"limit": limit} if limit else {}
    cfg = parse_config(
        model_config(True, device=s.device, data=data, train={"max_epochs": 1, "cache_dir": str(s.workdir / "fc")})
    )
    torch.manual_seed(0)
    run_ = Run(cfg)
    run_.splits = {"train": run_.splits["train"]}  # time training epochs only
    t0 = time.perf_counter()
    features = run_.prepare()
    extract_s = time.perf_counter() - t0
    records = run_.splits["train"]
    n = len(records)
    # mmfuse's training loader as `train` builds it (`train.steps_per_call: auto`: lists of 4 batches a Lightning
    # step) and the same batches one a Lightning step (the Lightning floor's, and mmfuse's second side)
    loader = make_loader(run_.model, records, "train", features, run_.loader_options)
    one_step = dataclasses.replace(run_.loader_options, steps_per_call=1)
    loader1 = make_loader(run_.model, records, "train", features, one_step)
    if len(next(iter(loader1))["index"]) != BATCH:  # what the target is stated at
        raise RuntimeError(f"frozen: expected batches of {BATCH}, the loader's first has {len(next(iter(loader1)))}")
    apply_trainer_flags(run_.cfg, s.workdir)

    # the bare loop's tensors: each record's cached features gathered once, labels collated once
    feats = {m: t.gather(features.rows["train"][m]).pooled.contiguous() for m, t in features.tables.items()}
    labels, masks = loader.dataset.labels, loader.dataset.masks
    total_steps = len(loader1)
    # the notebook's: its own frozen encoders run once over every record
    nb = notebook_model(run_.model).to(s.device)
    t0 = time.perf_counter()
    nb_feats = notebook_extract(nb, collate_batches_of(run_.model, records, 256), s.device)
    nb_extract_s = time.perf_counter() - t0
    nb_labels = labels[TASK]  # the same class indices (every easy-VQA record has its answer)

    rounds = s.rounds(3, 1)
    sides = ["bare", "lightning floor", "notebook once", "mmfuse", "mmfuse, 1 step a call"]
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    fit_s: list[float] = []
    for r in range(rounds):
        for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
            if side == "bare":
                wall, cpu_s = bare_epoch(run_, feats, labels, masks, r, total_steps)
            elif side == "lightning floor":
                floor = BareStepModule(copy.deepcopy(run_.model), run_.cfg, total_steps)
                wall, cpu_s, _ = lightning_epoch(floor, run_.cfg, loader1, s, f"floor{r}")
            elif side == "notebook once":
                wall, cpu_s = notebook_epoch(nb, nb_feats, nb_labels, run_.cfg, r, s.device)
            elif side == "mmfuse":
                wall, cpu_s, whole_s = mmfuse_epoch(run_, loader, s, r)
                fit_s.append(whole_s)
            else:
                wall, cpu_s, _ = mmfuse_epoch(run_, loader1, s, r)
            times[side].append(wall)
            cpu[side].append(cpu_s)
            print(f"  round {r + 1}/{rounds} {side}: {n / wall:.0f} samples/s (cpu {n / cpu_s:.0f})", flush=True)

    # context: the notebook loop that re-runs its frozen encoders every step
    warmup, steps = 1, s.steps(3, 2)
    nb_records = records[: (warmup + steps) * BATCH]
    dyn = collate_batches(run_.model, nb_records, warmup + steps)
    pad = pad_to_max(dyn, nb_records, run_.model.encoders["text"].tokenizer)
    notebook = {
        "notebook pad 128": loop_runner(notebook_step(nb, pad, s.device, frozen=True), s.device),
        "notebook dynamic": loop_runner(notebook_step(nb, dyn, s.device, frozen=True), s.device),
    }
    rerun = interleave(notebook, BATCH, 1, warmup, steps)

    sps = {k: n / statistics.median(v) for k, v in times.items()}
    per_round = {k: [n / t for t in v] for k, v in times.items()}
    cpu_sps = {k: n / statistics.median(v) for k, v in cpu.items()}

    def ratios(a: str, b: str, clock: dict[str, list[float]] = times) -> list[float]:
        """a's samples/s over b's, per round (the same round's epochs)."""
        return [tb / ta for ta, tb in zip(clock[a], clock[b])]

    ratio = {k: ratios("mmfuse", k) for k in ("bare", "notebook once", "lightning floor")}
    floor_bare = ratios("lightning floor", "bare")
    cpu_ratio = {"bare": ratios("mmfuse", "bare", cpu), "floor": ratios("mmfuse", "lightning floor", cpu)}
    cpu_floor_bare = ratios("lightning floor", "bare", cpu)
    one = "mmfuse, 1 step a call"
    one_bare, one_bare_cpu = ratios(one, "bare"), ratios(one, "bare", cpu)
    mm = sps["mmfuse"]

    def spread(k: str) -> str:
        return f"per round {fmt(min(per_round[k]))}-{fmt(max(per_round[k]))}; CPU time: {fmt(cpu_sps[k])}"

    def vs(rr: list[float]) -> str:
        return f"{fmt(statistics.median(rr))}x (per round {fmt(min(rr))}-{fmt(max(rr))})"

    res = Result("frozen")
    res.rows = [
        Row(
            "mmfuse: FeatureCache + CachedBatches + MMFuseModule + Trainer (steps_per_call auto: 4), training epoch",
            mm,
            "samples/s",
            f"{vs(ratio['bare'])} bare loop, {vs(ratio['lightning floor'])} Lightning floor, "
            f"{vs(ratio['notebook once'])} notebook extract-once; by CPU time {vs(cpu_ratio['bare'])} bare loop, "
            f"{vs(cpu_ratio['floor'])} Lightning floor",
            f"{n} records/epoch, batch {BATCH}, {spread('mmfuse')}; whole 1-epoch fit {statistics.median(fit_s):.2f} s",
        ),
        Row(
            "mmfuse with train.steps_per_call: 1 (one optimiser step a Lightning step), training epoch",
            sps[one],
            "samples/s",
            f"{vs(one_bare)} bare loop; by CPU time {vs(one_bare_cpu)}",
            spread(one),
        ),
        Row(
            "bare loop over mmfuse's cached tensors (same modules, fused AdamW, clip, schedule)",
            sps["bare"],
            "samples/s",
            "",
            spread("bare"),
        ),
        Row(
            "Lightning floor: the bare loop's step as a LightningModule, mmfuse's Trainer and loader",
            sps["lightning floor"],
            "samples/s",
            f"{vs(floor_bare)} bare loop; by CPU time {vs(cpu_floor_bare)}",
            spread("lightning floor"),
        ),
        Row(
            "notebook, features extracted once: concat -> Linear -> Linear on a precomputed tensor, AdamW(fused=True)",
            sps["notebook once"],
            "samples/s",
            "",
            spread("notebook once"),
        ),
        Row("one-off: mmfuse feature extraction (FeatureCache, distinct inputs)", extract_s, "s", "", f"{n} records"),
        Row("one-off: notebook feature extraction (every record, batch 256)", nb_extract_s, "s", "", f"{n} records"),
        side_row(
            "context: notebook re-running frozen encoders every step, pad 128",
            rerun["notebook pad 128"],
            f"T={tokens_per_batch(pad):.0f}",
            f"{fmt(mm / rerun['notebook pad 128'].per_second)}x below mmfuse",
            ref=reference("frozen notebook pad 128", s.device),
        ),
        side_row(
            "context: notebook re-running frozen encoders every step, dynamic padding",
            rerun["notebook dynamic"],
            f"T={tokens_per_batch(dyn):.1f}",
            f"{fmt(mm / rerun['notebook dynamic'].per_second)}x below mmfuse",
            ref=reference("frozen notebook dynamic", s.device),
        ),
    ]
    r_bare, r_nb = ratio["bare"], ratio["notebook once"]
    res.targets = [
        Target.at_least(
            f"frozen: mmfuse training epoch >= {TARGET_BARE}x the bare loop's samples/s at batch {BATCH} (issue 23)",
            statistics.median(r_bare),
            TARGET_BARE,
            r_bare,
        ),
        Target.at_least(
            f"frozen: mmfuse training epoch >= {TARGET_NOTEBOOK}x the notebook extract-once loop's samples/s",
            statistics.median(r_nb),
            TARGET_NOTEBOOK,
            r_nb,
        ),
    ]
    res.info = {
        "records": n,
        "batch_size": BATCH,
        "epoch_train_s": times,
        "epoch_train_cpu_s": cpu,
        "mmfuse_fit_s": fit_s,
        "feature_extraction_s": extract_s,
        "notebook_extraction_s": nb_extract_s,
        "mmfuse_over_side_per_round": ratio,
        "mmfuse_over_side_per_round_cpu_time": cpu_ratio,
        "mmfuse_1_step_a_call_over_bare_per_round": {"wall": one_bare, "cpu": one_bare_cpu},
        "floor_over_bare_per_round": {"wall": floor_bare, "cpu": cpu_floor_bare},
        "notebook_rerun_step_s": {k: m.times for k, m in rerun.items()},
    }
    return res


def notebook_extract(nb: object, batches: list[dict], device: object) -> object:
    """The notebook's one pass of its frozen encoders over every record: (N, 512 + H) features."""
    import torch

    nb.eval()
    with torch.no_grad():
        return torch.cat([nb.encode(b["inputs"]["image"], b["inputs"]["text"]) for b in to_device(batches, device)])


def notebook_epoch(
    nb: object, feats: object, labels: object, cfg: object, epoch: int, device: object
) -> tuple[float, float]:
    """One epoch of the notebook's loop over precomputed features (fresh copy of its fc + head); returns wall and CPU
    seconds."""
    import torch
    import torch.nn.functional as F

    fc, head = copy.deepcopy(nb.fc), copy.deepcopy(nb.head)
    params = [*fc.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    t0, c0 = now(device), time.process_time()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
    for idx in order.split(cfg.data.batch_size):
        loss = F.cross_entropy(head(fc(feats[idx])), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return now(device) - t0, time.process_time() - c0


def lightning_epoch(module: object, cfg: object, loader: object, s: Settings, name: str) -> tuple[float, float, float]:
    """One 1-epoch `fit` of `module` by mmfuse's own Trainer; returns the training epoch's wall and CPU seconds (from
    the epoch's start to its end hooks) and the whole fit's wall seconds."""
    _, EpochClock = lightning_callbacks()
    clock = EpochClock(s.device)
    trainer = mmfuse_trainer(cfg, s.workdir / name, [clock])
    t0 = now(s.device)
    trainer.fit(module, loader)
    return clock.train_only[0], clock.train_cpu[0], now(s.device) - t0


def mmfuse_epoch(run: object, loader: object, s: Settings, r: int) -> tuple[float, float, float]:
    """One 1-epoch `fit` of mmfuse (its Trainer, a fresh module, the model restored after): `lightning_epoch`."""
    saved = copy.deepcopy(run.model.state_dict())
    out = lightning_epoch(run.module(), run.cfg, loader, s, f"frozen_round{r}")
    run.model.load_state_dict(saved)
    return out


# ---------------------------------------------------------------- what the Lightning floor is made of
def floor_parts(limit: int, rounds: int, workdir: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """Per-step CPU time of the bare loop, the Lightning floor and its variants, and mmfuse (min and median over
    rotating rounds of one epoch each): which part of the floor is Lightning's loop, the Trainer's callbacks and
    loggers, and the loader (mmfuse's `CachedBatches` against the DataLoader it replaced). Also the cost of one
    `self.log` key in Lightning's result collection."""
    import lightning as L
    import torch
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
    from torch.utils.data import DataLoader

    from mmfuse.config import parse_config
    from mmfuse.train.data import IndexBatchSampler, make_loader
    from mmfuse.train.run import Run

    from bench_cached import BareStepModule, bare_epoch

    device = setup("cpu")
    train = {"max_epochs": 1, "cache_dir": str(cache_dir or workdir)}
    cfg = parse_config(model_config(True, data={"limit": limit}, train=train))
    run_ = Run(cfg)
    run_.splits = {"train": run_.splits["train"]}
    features = run_.prepare()
    one_step = dataclasses.replace(run_.loader_options, steps_per_call=1)  # the floor's: one step a Lightning step
    batches = make_loader(run_.model, run_.splits["train"], "train", features, one_step)
    apply_trainer_flags(run_.cfg, workdir)
    rows, n, steps = batches.dataset, len(run_.splits["train"]), len(batches)
    feats = {m: t.gather(features.rows["train"][m]).pooled.contiguous() for m, t in features.tables.items()}
    # what `make_loader` returned for the training split before `CachedBatches`: the same batches through a DataLoader
    sampler = IndexBatchSampler(n, BATCH, shuffle=True, seed=run_.loader_options.seed)
    loader = DataLoader(rows, sampler=sampler, batch_size=None, collate_fn=rows.collate, num_workers=0)

    _, EpochClock = lightning_callbacks()

    def fit(module: Any, data: Any, name: str, plain: bool = False, extra: int = 0) -> float:
        clock = EpochClock(device)
        callbacks = [clock, *(L.Callback() for _ in range(extra))]
        if plain:
            trainer = L.Trainer(
                max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0, deterministic=True,
                default_root_dir=workdir / name,
            )  # fmt: skip
        else:
            trainer = mmfuse_trainer(run_.cfg, workdir / name, callbacks)
        saved = copy.deepcopy(run_.model.state_dict())
        trainer.fit(module, data)
        run_.model.load_state_dict(saved)
        return clock.train_cpu[0]

    def floor() -> Any:
        return BareStepModule(copy.deepcopy(run_.model), run_.cfg, steps)

    sides = {
        "bare loop": lambda r: bare_epoch(run_, feats, rows.labels, rows.masks, r, steps)[1],
        "floor (mmfuse's Trainer, CachedBatches)": lambda r: fit(floor(), batches, f"a{r}"),
        "floor, the DataLoader CachedBatches replaced": lambda r: fit(floor(), loader, f"b{r}"),
        "floor + 3 no-op callbacks": lambda r: fit(floor(), batches, f"c{r}", extra=3),
        "floor, plain L.Trainer (no callbacks, no loggers)": lambda r: fit(floor(), batches, f"d{r}", plain=True),
        "mmfuse (MMFuseModule, its Trainer, CachedBatches)": lambda r: fit(run_.module(), batches, f"e{r}"),
        "mmfuse, the DataLoader CachedBatches replaced": lambda r: fit(run_.module(), loader, f"f{r}"),
    }
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            cpu[k].append(sides[k](r))
    results = _ResultCollection(training=True)
    value = torch.tensor(1.0)
    log_us = least_us(lambda: results.log("training_step", "k", value, on_step=True, batch_size=BATCH), 2000)
    parts = {  # the same parts alone, min over passes (steadier than whole epochs on a shared machine)
        "one batch of CachedBatches through Lightning's fetcher": least_us(lambda: fetch_all(batches), 5) / steps,
        "one batch of the DataLoader it replaced, likewise": least_us(lambda: fetch_all(loader), 5) / steps,
        **hook_costs(),
    }
    bare = cpu["bare loop"]
    print(f"| side ({n} records, batch {BATCH}) | CPU us/step, min | median | bare / side, of the mins | per round |")
    print("|---|---:|---:|---:|---:|")
    for k, v in cpu.items():
        low, mid = min(v) / steps * 1e6, statistics.median(v) / steps * 1e6
        per_round = statistics.median(b / x for b, x in zip(bare, v))
        print(f"| {k} | {low:,.0f} | {mid:,.0f} | {min(bare) / min(v):.3f} | {per_round:.3f} |")
    print(f"\none self.log key (Lightning's _ResultCollection.log): {log_us:.0f} us of CPU")
    for k, us in parts.items():
        print(f"{k}: {us:.1f} us of CPU")
    out = {"records": n, "batch_size": BATCH, "steps": steps, "epoch_cpu_s": cpu, "self_log_key_us": log_us}
    return {**out, "parts_cpu_us": parts}


def least_us(fn: Any, repeat: int, passes: int = 7) -> float:
    """The least CPU microseconds of one `fn()` over `passes` passes of `repeat` calls."""
    best = float("inf")
    for _ in range(passes):
        t0 = time.process_time()
        for _ in range(repeat):
            fn()
        best = min(best, (time.process_time() - t0) / repeat)
    return best * 1e6


def fetch_all(data: Any) -> None:
    """One epoch of `data` through what Lightning's training loop wraps it in (CombinedLoader + prefetching fetcher)."""
    from lightning.pytorch.loops.fetchers import _PrefetchDataFetcher
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    fetcher = _PrefetchDataFetcher()
    fetcher.setup(CombinedLoader(data, "max_size_cycle"))
    for _ in fetcher:
        pass


def hook_costs() -> dict[str, float]:
    """CPU of one Lightning callback hook call (as the training loop makes 5 a step) with 0 and 3 no-op callbacks."""
    import lightning as L
    import torch
    from lightning.pytorch.trainer import call

    def cost(k: int) -> float:
        trainer = L.Trainer(callbacks=[L.Callback() for _ in range(k)], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.strategy.connect(L.LightningModule())
        loss = torch.tensor(1.0)
        return least_us(lambda: call._call_callback_hooks(trainer, "on_before_backward", loss), 5000)

    return {f"one callback hook call of the training loop, {k} callbacks": cost(k) for k in (0, 3)}


def main() -> None:
    import argparse
    import json
    import tempfile

    p = argparse.ArgumentParser(description="frozen: what the Lightning floor is made of (see floor_parts)")
    p.add_argument("--limit", type=int, default=4096, help="easy-VQA training records")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", help="JSON of every epoch's CPU seconds")
    p.add_argument("--cache-dir", type=Path, help="the feature cache (default: a temporary folder, encoded again)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mmfuse-floor-") as tmp:
        out = floor_parts(args.limit, args.rounds, Path(tmp), args.cache_dir)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
