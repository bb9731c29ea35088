"""Through the CLI: a run written when the lr schedule was one LambdaLR (its checkpoint's scheduler state in the
old form) resumes and ends with the same weights as an uninterrupted run; the training losses are written every
`log_every_n_steps` steps, as Lightning's own logging cadence."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from mmfuse.cli import main
from mmfuse.train.run import load_checkpoint
from tiny import run_config, write_dataset

WARM = 7  # longer than the 2 epochs of 3 steps: every lr is the warm-up's, whatever the run's length


def _old_state(new_state: dict) -> dict:
    """The scheduler state the old code wrote after the same steps: one LambdaLR's."""
    steps = int(new_state["last_epoch"])
    base = new_state["_schedulers"][0]["base_lrs"]
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in base], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / WARM if s < WARM else 1.0)
    for _ in range(steps):
        opt.step()
        sched.step()
    return sched.state_dict()


def _train_loss_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_an_old_checkpoint_resumes_exactly_and_losses_are_logged_every_n_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMFUSE_CACHE_DIR", str(tmp_path / "cache"))
    records = write_dataset(tmp_path / "data", n=40)  # 20 training records, batch 8: 3 steps an epoch
    cfg = run_config(records, max_epochs=2, warmup_steps=WARM, log_every_n_steps=2)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(whole)]) == 0
    assert _train_loss_steps(whole) == [1, 3, 5]  # (step + 1) % 2 == 0 over steps 0..5

    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(cut), "--set", "train.max_epochs=1"]) == 0
    last = cut / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)
    assert "_schedulers" in ckpt["lr_schedulers"][0]  # a warm-up run's scheduler is now a SequentialLR
    ckpt["lr_schedulers"] = [_old_state(ckpt["lr_schedulers"][0])]
    torch.save(ckpt, last)
    assert main(["train", "--out", str(cut), "--resume", "--set", "train.max_epochs=2"]) == 0

    a, b = (load_checkpoint(d / "checkpoints" / "last.ckpt") for d in (whole, cut))
    assert a["global_step"] == b["global_step"] == 6
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    lrs = [g["lr"] for g in b["optimizer_states"][0]["param_groups"]]
    assert [g["lr"] for g in a["optimizer_states"][0]["param_groups"]] == lrs
    assert math.isclose(lrs[0], 0.01 * 7 / WARM)  # step 6 would train at (6 + 1) / 7 of the lr
    assert _train_loss_steps(cut) == [1, 3, 5]
