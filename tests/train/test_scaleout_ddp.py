"""Two-process DDP (gloo, CPU) with partially labelled tasks: no hang, and the metrics of a single process.

Every DDP run goes through `scaleout.run_cli`: its own process group, killed whole and failed on timeout.
The reference is a single-process `evaluate` of the weights the DDP run saved (DDP training itself sees
other batches than one process would, so the comparison is of the evaluation, on the same weights).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml
from scaleout import DDP, EVAL_LABELLED, EVAL_SIZE, partial_config, run_cli, write_partial_dataset
from torch.utils.data import DataLoader, Sampler

from mmfuse.config import parse_config
from mmfuse.train.data import make_loader
from mmfuse.train.run import Run, evaluate, evaluate_module, load_checkpoint
from mmfuse.train.sharding import PaddedEvalSampler, _CollatePadding, _FlagPadding

TOL = 1e-5


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOL, abs_tol=TOL) or (math.isnan(a) and math.isnan(b))


def _assert_same(ddp: dict[str, dict[str, float]], single: dict[str, dict[str, float]]) -> None:
    assert set(ddp) == set(single)
    for task in single:
        assert set(ddp[task]) == set(single[task]), task
        for metric, value in single[task].items():
            assert _close(ddp[task][metric], value), (task, metric, ddp[task][metric], value)


def _epoch_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """{epoch: {val key: value}} of the CSV log; fails if an epoch's validation row appears twice."""
    out: dict[int, dict[str, float]] = {}
    with open(run_dir / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            vals = {k: float(v) for k, v in row.items() if k.startswith("val/") and v}
            if vals:
                epoch = int(float(row["epoch"]))
                assert epoch not in out, f"epoch {epoch} logged twice"
                out[epoch] = vals
    return out


def _train_ddp(tmp_path: Path, cfg: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    proc = run_cli(["train", str(tmp_path / "cfg.yaml"), "--out", str(run_dir), *DDP], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # only rank 0 reports
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["world_size"] == 2
    return run_dir, summary


def _check_against_single_process(run_dir: Path, summary: dict[str, Any]) -> None:
    for split in ("val", "test"):
        _assert_same(summary["metrics"][split], evaluate(run_dir, split))
    # The validation run inside fit (DDP, every epoch) agrees too, at the epoch of the best checkpoint.
    best_epoch = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")["epoch"]
    logged = _epoch_rows(run_dir)
    assert sorted(logged) == list(range(summary["epochs"]))
    flat = {f"val/{t}/{m}": v for t, ms in summary["metrics"]["val"].items() for m, v in ms.items()}
    in_fit = {k: v for k, v in logged[best_epoch].items() if k != "val/loss"}
    assert set(in_fit) == set(flat)
    for key, value in flat.items():
        assert _close(in_fit[key], value), (key, in_fit[key], value)


@pytest.mark.slow
def test_ddp_partially_labelled_tasks_of_every_kind_match_one_process(tmp_path: Path) -> None:
    records = write_partial_dataset(tmp_path / "data")
    run_dir, summary = _train_ddp(tmp_path, partial_config(records))
    # Each task kind has labelled rows on one rank's validation shard only (or on a single row).
    assert set(summary["metrics"]["val"]) == set(EVAL_LABELLED) == set(summary["metrics"]["test"])
    _check_against_single_process(run_dir, summary)


@pytest.mark.slow
def test_ddp_pcgrad_with_ogm_ge_matches_one_process(tmp_path: Path) -> None:
    records = write_partial_dataset(tmp_path / "data")
    cfg = partial_config(records, weighting={"name": "pcgrad", "seed": 0}, balance={"name": "ogm_ge", "task": "color"})
    cfg["model"]["encoders"]["text"]["freeze"] = False  # a trained shared encoder for PCGrad and OGM-GE to act on
    cfg["model"]["fusion"]["adapters"] = True  # the frozen image side: OGM-GE acts on its adapter
    run_dir, summary = _train_ddp(tmp_path, cfg)
    assert "unimodal" in summary["metrics"]["val"]  # per-modality accuracy of the scored task, gathered too
    assert any(k.startswith("balance/coef/") for k in (run_dir / "logs" / "metrics.csv").read_text().split(","))
    _check_against_single_process(run_dir, summary)


# ---------------------------------------------------------------------------- the sharding, without DDP
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_padded_eval_sampler_evaluates_every_record_once(world: int) -> None:
    for n in range(1, 14):
        shards = [list(PaddedEvalSampler(n, world, rank)) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1  # the same number of batches on every rank
        assert sorted(i for s in shards for i in s if i < n) == list(range(n))  # each record once
        assert all(n <= i < 2 * n for s in shards for i in s if i >= n)  # repeats: flagged indices of real records
        assert sum(i >= n for s in shards for i in s) == -n % world


class _Order(Sampler[int]):
    def __init__(self, order: list[int]) -> None:
        self.order = order

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def test_padding_rows_are_never_counted(tmp_path: Path) -> None:
    """The same records, plus flagged repeats of some of them: the same metrics as without the repeats."""
    records = write_partial_dataset(tmp_path / "data")
    run = Run(parse_config(partial_config(records)))  # random weights: only the counting matters here
    model = run.model.eval()
    run.splits = {"val": run.splits["val"]}
    feats = run.prepare()
    plain = make_loader(model, run.splits["val"], "val", feats, run.loader_options)
    n = len(plain.dataset)
    assert n == EVAL_SIZE
    repeats = [n + 0, n + 1, n + 8]  # rows 0 (size, colour), 1 (flag) and 8 (tags) once more
    padded = DataLoader(
        _FlagPadding(plain.dataset),
        batch_size=4,
        sampler=_Order(list(range(n)) + repeats),
        collate_fn=_CollatePadding(plain.collate_fn),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    a = evaluate_module(trainer, run.module(), plain, "val")
    b = evaluate_module(trainer, run.module(), padded, "val")
    _assert_same(b, a)
    # ... while counting the repeats (as DDP's default sampler would) changes them.
    unflagged = DataLoader(
        plain.dataset, batch_size=4, sampler=_Order([*range(n), 0, 1, 8]), collate_fn=plain.collate_fn
    )
    c = evaluate_module(trainer, run.module(), unflagged, "val")
    assert not _close(c["size"]["mae"], a["size"]["mae"])  # two labelled rows, one of them counted twice
