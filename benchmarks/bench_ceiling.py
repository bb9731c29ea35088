"""4. ceiling: how close the fine-tuning step comes to this machine's measured matmul rate.

Matmul: square fp32 matmuls (2048 on CPU, 8192 on CUDA), 2 * n^3 FLOPs each, at 2 threads.
Step: mmfuse's fine-tuning step (as in `finetune`: MMFuseModule via its Trainer). Its FLOPs are counted with
`torch.utils.flop_counter.FlopCounterMode` over forward + backward of each timed batch (matmuls,
convolutions, attention; elementwise work and the optimiser count zero), so the fraction is conservative.
Both are interleaved in rounds. The headline figure is median step FLOP/s over the MEDIAN matmul FLOP/s of the
same run; the share of the BEST matmul rate measured in the same run (the fastest single matmul: the
machine's least-disturbed rate, a stricter ceiling) is reported beside it, with its own target line.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from common import (
    BATCH,
    TASK,
    Result,
    Row,
    Settings,
    Target,
    apply_trainer_flags,
    build_reference,
    collate_batches,
    fresh_copy,
    interleave,
    lightning_runner,
    list_loader,
    loop_runner,
    mmfuse_module,
    model_config,
    reference,
    to_device,
    train_records,
)

TARGET = 0.65


def step_flops(model: torch.nn.Module, batch: dict, device: torch.device) -> int:
    """FLOPs of forward + backward of one training step on `batch`."""
    model.train()
    batch = to_device(batch, device)
    with FlopCounterMode(display=False) as counter:
        logits = model(batch["inputs"]).logits[TASK]
        F.cross_entropy(logits, batch["labels"][TASK]).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run(s: Settings) -> Result:
    from mmfuse.config import parse_config

    rounds, warmup, steps = s.rounds(3), s.steps(2, 1), s.steps(5, 2)
    n = warmup + steps
    size = 8192 if s.device.type == "cuda" else 2048
    cfg = parse_config(model_config(False, device=s.device))
    ref = build_reference(freeze=False)
    batches = collate_batches(ref, train_records(n * BATCH), n)
    counter_model = fresh_copy(ref).to(s.device)
    flops = [step_flops(counter_model, b, s.device) for b in batches]
    del counter_model
    apply_trainer_flags(cfg, s.workdir)

    a = torch.randn(size, size, device=s.device)
    b = torch.randn(size, size, device=s.device)
    mm_model = fresh_copy(ref)
    runners = {
        "matmul": loop_runner(lambda i: torch.mm(a, b), s.device),
        "mmfuse": lightning_runner(
            lambda: mmfuse_module(mm_model, cfg), cfg, lambda k: list_loader(batches[:k]), s.workdir, s.device
        ),
    }
    m = interleave(runners, BATCH, rounds, warmup, steps)
    mm_rates = [2 * size**3 / t for t in m["matmul"].times]
    step_rates = [flops[warmup + j] / t for r in m["mmfuse"].rounds for j, t in enumerate(r)]
    peak, achieved = statistics.median(mm_rates), statistics.median(step_rates)
    best = max(mm_rates)
    frac, frac_best = achieved / peak, achieved / best
    per_round = [
        statistics.median(flops[warmup + j] / t for j, t in enumerate(sr))
        / statistics.median(2 * size**3 / t for t in mr)
        for sr, mr in zip(m["mmfuse"].rounds, m["matmul"].rounds)
    ]
    per_round_best = [
        statistics.median(flops[warmup + j] / t for j, t in enumerate(sr)) / (2 * size**3 / min(mr))
        for sr, mr in zip(m["mmfuse"].rounds, m["matmul"].rounds)
    ]
    res = Result("ceiling")
    res.rows = [
        Row(
            f"matmul {size}x{size} fp32",
            peak / 1e9,
            "GFLOP/s",
            "",
            f"median of {len(mm_rates)} matmuls; best {best / 1e9:.0f}",
            reference("matmul GFLOP/s", s.device),
        ),
        Row(
            "mmfuse fine-tuning step",
            achieved / 1e9,
            "GFLOP/s",
            f"{frac:.0%} of median matmul, {frac_best:.0%} of best",
            f"{statistics.mean(flops) / 1e9:.1f} GFLOP/step (fwd+bwd), {BATCH / m['mmfuse'].median:.1f} samples/s",
            reference("finetune GFLOP/s", s.device),
        ),
    ]
    res.targets = [
        Target.at_least(
            "ceiling: fine-tuning step >= 65% of matmul GFLOP/s (headline: median matmul rate of the run)",
            frac,
            TARGET,
            per_round,
        ),
        Target.at_least(
            "ceiling: fine-tuning step >= 65% of the BEST matmul GFLOP/s of the run (stricter)",
            frac_best,
            TARGET,
            per_round_best,
        ),
    ]
    res.info = {
        "matmul_gflops": [r / 1e9 for r in mm_rates],
        "step_gflop": [f / 1e9 for f in flops],
        "step_s": m["mmfuse"].times,
        "matmul_size": size,
        "share_of_median_matmul": frac,
        "share_of_best_matmul": frac_best,
    }
    return res
