"""What a trained member costs: its parameter counts and the forward latency of its model.

Latency is `torch.utils.benchmark.Timer`'s median (`blocked_autorange`): the trained model's forward on a batch of
1 and of 64 (`LATENCY_BATCHES`) of its own evaluation records, from what the model trained on: cached features for
the cached (frozen) modalities, collated inputs (through the encoder) for the others. Batching, data loading and
the feature-cache lookup are outside the timing. On the CPU the timer runs the forward on one thread (on a shared
CPU a thread pool makes the time mostly the scheduler's); on a GPU it synchronises around each timed block.

Units: latency in milliseconds per forward of one batch (not per record); parameters as element counts.
"""

from __future__ import annotations

import json
import timeit
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark

from mmfuse.io import atomic_write_text

LATENCY_BATCHES = (1, 64)  # batch sizes timed; compare.json's latency_ms keys are their str()
MIN_RUN_S = 0.2  # each batch size is timed for at least this long


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """{"trainable": elements of the parameters that train, "total": elements of all of them}."""
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def measure_member(run_dir: Path, cache_file: Path, repeats: dict[int, int] | None = None) -> dict[str, Any]:
    """Parameter counts and the forward latency of a finished member (read back from `cache_file` when fresh).

    Args:
        run_dir: the member's finished run folder (its `metrics.json` dates the measurement).
        cache_file: where the measurement is kept; reused while it is newer than the member's metrics.
        repeats: {batch size: the fewest timed replicates} (default {1: 30, 64: 10}).

    Returns:
        {"params": `count_parameters`, "latency_ms": {"1": ms, "64": ms}, "latency_from": {modality: "cached
        features" or "inputs"}, "latency_device": "cpu, 1 thread" or the CUDA device}.
    """
    metrics_file = run_dir / "metrics.json"
    if cache_file.exists() and cache_file.stat().st_mtime >= metrics_file.stat().st_mtime:
        try:
            return json.loads(cache_file.read_text())
        except ValueError:
            pass
    out = _measure(run_dir, repeats or {1: 30, 64: 10})
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache_file, json.dumps(out, indent=2))
    return out


def _measure(run_dir: Path, repeats: dict[int, int]) -> dict[str, Any]:
    """Open the run, prepare `max(LATENCY_BATCHES)` of its evaluation records (repeated when fewer) and time it."""
    from mmfuse.runs import open_run
    from mmfuse.train.data import make_loader
    from mmfuse.train.run import Run

    loaded = open_run(run_dir)
    model, cfg = loaded.model, loaded.config
    params = count_parameters(model)
    run = Run(cfg, model)
    split = next(s for s in ("test", "val", "train") if run.splits.get(s))
    records = run.splits[split]
    size = max(LATENCY_BATCHES)
    records = (records * (size // len(records) + 1))[:size]
    run.splits = {split: records}
    feats = run.prepare()
    device = torch.device("cuda" if torch.cuda.is_available() and run.options.accelerator != "cpu" else "cpu")
    model = model.to(device).eval()
    latency: dict[str, float] = {}
    for b in LATENCY_BATCHES:
        opts = replace(run.loader_options, eval_batch_size=b, num_workers=0)
        batch = next(iter(make_loader(model, records, split, feats, opts)))
        latency[str(b)] = round(forward_median_ms(model, batch, device, repeats[b]), 4)
    sources = {m: "cached features" if m in feats.tables else "inputs" for m in model.encoders}
    shown = str(device) if device.type == "cuda" else "cpu, 1 thread"
    return {"params": params, "latency_ms": latency, "latency_from": sources, "latency_device": shown}


def forward_median_ms(model: torch.nn.Module, batch: dict[str, Any], device: torch.device, repeats: int) -> float:
    """Median time (ms) of one `model(inputs, features)` forward on `batch`, under `torch.inference_mode`.

    `benchmark.Timer.blocked_autorange` runs blocks of forwards for at least `MIN_RUN_S` seconds (its block-size
    estimate is the warm-up); when that gives fewer than `repeats` blocks (slow forwards), it runs again for long
    enough to give about `repeats`. The median is over the blocks' per-forward times.
    """
    from mmfuse.utils import move_to

    inputs, features = move_to(batch["inputs"], device), move_to(batch.get("features") or {}, device)
    # on the CPU a plain clock: the Timer's default one synchronises any GPU the machine has, around each block
    clock = {} if device.type == "cuda" else {"timer": timeit.default_timer}
    scope = {"model": model, "inputs": inputs, "features": features}
    timer = benchmark.Timer(stmt="model(inputs, features)", globals=scope, num_threads=1, **clock)
    with torch.inference_mode():  # around the whole timing: grad mode is per thread, and the Timer runs in this one
        m = timer.blocked_autorange(min_run_time=MIN_RUN_S)
        if len(m.times) < repeats:  # s per block x blocks wanted, with a margin
            m = timer.blocked_autorange(min_run_time=1.2 * repeats * m.median * m.number_per_run)
    return 1000.0 * m.median
