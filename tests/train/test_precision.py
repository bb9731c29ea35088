"""Mixed precision with the default optimiser (fused AdamW) and gradient clipping.

On the CPU: bf16-mixed through the CLI path, and float16 autocast with a GradScaler (the 16-mixed code
path of a GPU: the scaler, unscaling before clipping, a fused optimiser that skips overflowing steps).
The tests marked `gpu` run the same on a CUDA device and skip cleanly without one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from mmfuse.config import parse_config
from mmfuse.train.data import make_loader
from mmfuse.train.module import MMFuseModule
from mmfuse.train.run import Run, train
from tiny import run_config, write_dataset

CLIP = 0.05  # far below the gradient norms of a fresh tiny model, so clipping must act on every step


class RecordingModule(MMFuseModule):
    """Records the gradient norm before and after the module clips, at every step."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        before = _norm(optimizer) / scale  # fused optimisers are unscaled by the module itself
        super().on_before_optimizer_step(optimizer)
        self.norms.append((before, _norm(optimizer)))


def _norm(optimizer: torch.optim.Optimizer) -> float:
    grads = [p.grad.float() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _fit(tmp_path: Path, accelerator: str, **trainer: Any) -> tuple[RecordingModule, dict[str, torch.Tensor]]:
    cfg = parse_config(run_config(write_dataset(tmp_path / "data", n=32), grad_clip=CLIP, accelerator=accelerator))
    run = Run(cfg)
    feats = run.prepare()
    t = run.cfg.train
    module = RecordingModule(
        run.model, run.module().weighting, None, lr=t.lr, grad_clip=t.grad_clip, weight_decay=t.weight_decay
    )
    module.norms = []
    before = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    fitter = L.Trainer(
        max_epochs=1,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer,
    )
    fitter.fit(module, make_loader(run.model, run.splits["train"], "train", feats, run.loader_options))
    return module, before


def _assert_clipped_and_trained(module: RecordingModule, before: dict[str, torch.Tensor]) -> None:
    opt = module.optimizers().optimizer
    assert getattr(opt, "_step_supports_amp_scaling", False), "the default optimiser is the fused AdamW"
    assert module.norms, "no optimiser step ran"
    for pre, post in module.norms:
        assert pre > 2 * CLIP  # clipping had something to do ...
        assert post <= CLIP * 1.01  # ... and did it
    after = module.model.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k].cpu())]
    assert changed, "no weight changed: the optimiser never stepped"


def test_bf16_mixed_on_cpu_clips_with_fused_adamw(tmp_path: Path) -> None:
    module, before = _fit(tmp_path, "cpu", precision="bf16-mixed")
    _assert_clipped_and_trained(module, before)


def test_float16_with_grad_scaler_on_cpu_unscales_before_clipping(tmp_path: Path) -> None:
    """The 16-mixed path (GradScaler + fused AdamW + clipping), run on the CPU with a CPU scaler."""
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))
    module, before = _fit(tmp_path, "cpu", plugins=[plugin])
    _assert_clipped_and_trained(module, before)


def test_cli_path_bf16_mixed_default_config(tmp_path: Path) -> None:
    """`train.precision=bf16-mixed` with the defaults (grad_clip 1.0) trains and evaluates end to end."""
    cfg = parse_config(run_config(write_dataset(tmp_path / "data", n=32), precision="bf16-mixed", max_epochs=1))
    assert cfg.train.grad_clip == 1.0
    summary = train(cfg, tmp_path / "run")
    assert summary["precision"] == "bf16-mixed"
    assert all(v == v for m in summary["metrics"]["test"].values() for v in m.values())  # no NaN


def test_16_mixed_on_cpu_runs_as_bf16_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_config(run_config(write_dataset(tmp_path / "data", n=24), precision="16-mixed", max_epochs=1))
    with caplog.at_level("WARNING", logger="mmfuse"):
        summary = train(cfg, tmp_path / "run")
    assert summary["precision"] == "bf16-mixed"
    assert any("16-mixed runs as bf16-mixed" in r.getMessage() for r in caplog.records)
    assert "precision bf16-mixed" in (tmp_path / "run" / "report.md").read_text()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gpu_mixed_precision_clips_with_fused_adamw(tmp_path: Path, precision: str) -> None:
    module, before = _fit(tmp_path, "gpu", precision=precision)
    _assert_clipped_and_trained(module, before)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gpu_train_end_to_end(tmp_path: Path, precision: str) -> None:
    cfg = parse_config(run_config(write_dataset(tmp_path / "data", n=32), precision=precision, accelerator="gpu"))
    summary = train(cfg, tmp_path / "run")
    assert summary["device"].startswith("cuda") and summary["precision"] == precision
    assert all(v == v for m in summary["metrics"]["test"].values() for v in m.values())
