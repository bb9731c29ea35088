"""The trainer and the report take plain options built by `mmfuse.builders`: no module of `mmfuse.train` reads a
RunConfig's fields except to hand a sub-config straight to a `build_*` builder."""

from __future__ import annotations

import ast
from dataclasses import asdict, fields
from pathlib import Path

from mmfuse.builders import OptimOptions, TrainOptions, run_summary, train_options
from mmfuse.config import TrainConfig, parse_config
from mmfuse.train.report import write_report
from tiny import run_config

TRAIN = Path(__file__).parents[2] / "src" / "mmfuse" / "train"
SECTIONS = {"train", "data", "model", "tasks", "seed", "name"}


def _config_reads(path: Path) -> list[str]:
    """`cfg.<section>` / `self.cfg.<section>` / `run.cfg.<section>` reads that are not a builder's argument."""
    tree = ast.parse(path.read_text())
    handed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.startswith("build_"):
            handed |= {id(sub) for arg in node.args for sub in ast.walk(arg)}
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in SECTIONS) or id(node) in handed:
            continue
        base = node.value
        named = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
        if named == "cfg":
            out.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_trainer_module_reads_the_run_config() -> None:
    reads = [r for path in sorted(TRAIN.glob("*.py")) for r in _config_reads(path)]
    assert reads == []


def test_train_options_carry_every_train_key_they_name(tmp_path: Path) -> None:
    raw = run_config(tmp_path / "r.jsonl", warmup_steps=5, scheduler="constant", lr=0.02, optimizer="sgd")
    raw["train"].update(momentum=0.5, grad_clip=0.0, max_epochs=3, log_every_n_steps=7, monitor="val/loss")
    raw["seed"] = 11
    cfg = parse_config(raw)
    options = train_options(cfg)
    for f in fields(TrainOptions):
        if f.name in TrainConfig.model_fields:
            assert getattr(options, f.name) == getattr(cfg.train, f.name), f.name
    for name, value in asdict(options.optim).items():
        assert value == (cfg.seed if name == "seed" else getattr(cfg.train, name)), name
    assert options.seed == 11 and options.optim == OptimOptions(**asdict(options.optim))


def test_the_report_header_comes_from_the_run_summary(tmp_path: Path) -> None:
    cfg = parse_config(run_config(tmp_path / "r.jsonl"))
    summary = {
        "records": {"train": 3},
        "bad_records": 0,
        "monitor": "val/loss",
        "epochs": 1,
        "best_checkpoint": "checkpoints/best.ckpt",
        "device": "cpu",
        "world_size": 1,
        "timings_s": {"total": 1.0},
        "metrics": {},
    }
    write_report(tmp_path, run_summary(cfg), summary, [])
    head = (tmp_path / "report.md").read_text().splitlines()[:5]
    assert head == [
        "# mmfuse run: tiny",
        "",
        "- encoders: image: torchvision resnet18, text: hf_text ",
        "- fusion: concat",
        "- weighting: equal",
    ]
