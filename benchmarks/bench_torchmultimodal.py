"""3. torchmultimodal: TorchMultiModal's `LateFusion` + `ConcatFusionModule` vs mmfuse's concat MultiTaskModel.

Both wrap the very same encoders (copies of the reference model's, with the same weights; for LateFusion
wrapped to return the pooled tensor), the same concat -> Linear(896, 256) -> Linear(256, 13), and run in
the same hand-written loop (forward, cross-entropy, backward, `AdamW(fused=True)`, the kernel mmfuse uses) on the
same dynamically padded batches:
what differs is the model code alone. Inference: forward under `torch.inference_mode()` in eval mode.

Training is also compared as each library is run: TorchMultiModal ships models, not a training loop, so its
users write the loop above (given the fused AdamW too, so that the flag is not what is compared); mmfuse
users run `mmfuse train`, i.e. `MMFuseModule` under mmfuse's Trainer (fused AdamW, grad clipping 1.0, schedule,
logging), on the same batches.

Needs `pip install torchmultimodal-nightly iopath --no-deps` (iopath also imports portalocker:
`pip install portalocker --no-deps`); without them this comparison is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common import (
    BATCH,
    TASK,
    Result,
    Settings,
    Target,
    apply_trainer_flags,
    build_reference,
    collate_batches,
    fmt,
    fresh_copy,
    interleave,
    lightning_runner,
    list_loader,
    loop_runner,
    mmfuse_module,
    model_config,
    round_ratios,
    side_row,
    to_device,
    train_records,
)


class Pooled(nn.Module):
    """An mmfuse encoder that returns its pooled (B, D) tensor, as LateFusion expects."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Any) -> torch.Tensor:
        return self.encoder(x).pooled


def late_fusion(ref: Any) -> nn.Module:
    from torchmultimodal.models.late_fusion import LateFusion
    from torchmultimodal.modules.fusions.concat_fusion import ConcatFusionModule

    enc = fresh_copy(ref.encoders)
    projection, head = fresh_copy(ref.fusion.fc_out), fresh_copy(ref.heads[TASK].net[-1])
    encoders = nn.ModuleDict({m: Pooled(e) for m, e in enc.items()})
    return LateFusion(encoders, ConcatFusionModule(projection), head)


def train_step(model: nn.Module, logits_of: Callable, batches: list, device: torch.device) -> Callable[[int], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(i: int) -> None:
        model.train()
        batch = to_device(batches[i % len(batches)], device)
        loss = F.cross_entropy(logits_of(model, batch["inputs"]), batch["labels"][TASK])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def infer_step(model: nn.Module, logits_of: Callable, batches: list, device: torch.device) -> Callable[[int], None]:
    def step(i: int) -> None:
        model.eval()
        with torch.inference_mode():
            logits_of(model, to_device(batches[i % len(batches)], device)["inputs"]).argmax(-1)

    return step


def run(s: Settings) -> Result:
    try:
        import torchmultimodal  # noqa: F401
        from torchmultimodal.models.late_fusion import LateFusion  # noqa: F401
    except Exception as err:  # ImportError, or iopath's own missing dependency
        return Result(
            "torchmultimodal",
            skipped=f"cannot import torchmultimodal ({type(err).__name__}: {err}); "
            "pip install torchmultimodal-nightly iopath portalocker --no-deps",
        )
    from mmfuse.config import parse_config

    rounds, warmup, steps = s.rounds(3), s.steps(1), s.steps(6, 2)
    n = warmup + steps
    ref = build_reference(freeze=False)
    batches = collate_batches(ref, train_records(n * BATCH), n)
    cfg = parse_config(model_config(False, device=s.device))
    apply_trainer_flags(cfg, s.workdir)
    mm = fresh_copy(ref).to(s.device)
    tmm = late_fusion(ref).to(s.device)
    mm_run = fresh_copy(ref)

    def mm_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
        return model(inputs).logits[TASK]

    def tmm_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
        return model(inputs)

    train = interleave(
        {
            "mmfuse": loop_runner(train_step(mm, mm_logits, batches, s.device), s.device),
            "torchmultimodal": loop_runner(train_step(tmm, tmm_logits, batches, s.device), s.device),
            "mmfuse as run": lightning_runner(
                lambda: mmfuse_module(mm_run, cfg), cfg, lambda k: list_loader(batches[:k]), s.workdir, s.device
            ),
        },
        BATCH,
        rounds,
        warmup,
        steps,
    )
    infer = interleave(
        {
            "mmfuse": loop_runner(infer_step(mm, mm_logits, batches, s.device), s.device),
            "torchmultimodal": loop_runner(infer_step(tmm, tmm_logits, batches, s.device), s.device),
        },
        BATCH,
        rounds,
        warmup,
        s.steps(8, 3),
    )

    def versus(m: dict, side: str, what: str) -> tuple[float, Target]:
        """mmfuse's `side` against torchmultimodal in the comparison `m`: the ratio and its target `what` (>= 1)."""
        ratio = m[side].per_second / m["torchmultimodal"].per_second
        rr = round_ratios(m[side], m["torchmultimodal"])
        return ratio, Target(f"torchmultimodal: mmfuse {what}", ratio, 1.0, ratio >= 1.0, (min(rr), max(rr)))

    train_ratio, train_target = versus(train, "mmfuse", "train step at least as fast (model code alone)")
    run_ratio, run_target = versus(train, "mmfuse as run", "train step as each is run at least as fast")
    infer_ratio, infer_target = versus(infer, "mmfuse", "inference at least as fast (model code alone)")
    res = Result("torchmultimodal")
    res.rows = [
        side_row(
            "train step: mmfuse MultiTaskModel (concat)", train["mmfuse"], vs=f"{fmt(train_ratio)}x torchmultimodal"
        ),
        side_row(
            "train step: torchmultimodal LateFusion + ConcatFusionModule",
            train["torchmultimodal"],
            "AdamW(fused=True)",
        ),
        side_row(
            "train step as run: mmfuse's Trainer (MMFuseModule, fused AdamW, clip 1.0)",
            train["mmfuse as run"],
            vs=f"{fmt(run_ratio)}x torchmultimodal",
        ),
        side_row(
            "inference: mmfuse MultiTaskModel (concat)", infer["mmfuse"], vs=f"{fmt(infer_ratio)}x torchmultimodal"
        ),
        side_row("inference: torchmultimodal LateFusion + ConcatFusionModule", infer["torchmultimodal"]),
    ]
    res.targets = [train_target, run_target, infer_target]
    res.info = {what: {k: v.times for k, v in m.items()} for what, m in (("train step", train), ("inference", infer))}
    return res
