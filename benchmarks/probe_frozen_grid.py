"""Which fusion learns the relations set's answer over a frozen, cached token grid? A hand loop, per question type.

Builds the config's model and cached features the way `mmfuse train` does (`Run.prepare`, `make_loader`), replaces
the fusion with `--fusion` (a YAML mapping) and the tasks with `answer` alone, and trains with Adam + one-cycle for
`--steps` steps; every `--eval-every` steps prints the validation accuracy per question type (from the val file's
`question_type` field). No Lightning, no checkpoints: a probe of the fusion, not a run.

Usage (in a folder where data/relations is the generated set):
    python benchmarks/probe_frozen_grid.py CONFIG --fusion '{name: co_attention, readout: cls, hidden_dim: 128}'
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
import yaml

from mmfuse.config import parse_config
from mmfuse.train.data import make_loader
from mmfuse.train.run import Run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--fusion", required=True, help="the fusion as a YAML mapping")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=500)
    a = p.parse_args()
    with open(a.config, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    raw["model"]["fusion"] = yaml.safe_load(a.fusion)
    raw["tasks"] = {"answer": {"kind": "multiclass"}}
    raw["data"]["batch_size"] = a.batch
    torch.manual_seed(0)
    run = Run(parse_config(raw))
    feats = run.prepare()
    model = run.model
    train = make_loader(model, run.splits["train"], "train", feats, run.loader_options)
    val = make_loader(model, run.splits["val"], "val", feats, run.loader_options)
    with open(raw["data"]["val"], encoding="utf-8") as f:
        qtype = [json.loads(line)["question_type"] for line in f if line.strip()]
    assert len(qtype) == len(run.splits["val"]), "the val file's records and the loaded records differ"
    params = [p for p in model.parameters() if p.requires_grad]
    print("trained parameters", sum(p.numel() for p in params), flush=True)
    opt = torch.optim.Adam(params, lr=a.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.1)
    task = model.tasks["answer"]

    def evaluate() -> dict[str, float]:
        model.eval()
        right, n = collections.Counter(), collections.Counter()
        with torch.no_grad():
            for b in val:
                ok = model(b.get("inputs", {}), b["features"]).logits["answer"].argmax(1) == b["labels"]["answer"]
                for i, o in zip(b["index"].tolist(), ok.tolist()):
                    for t in (qtype[i], "all"):
                        right[t] += o
                        n[t] += 1
        model.train()
        return {t: round(100 * right[t] / n[t], 1) for t in sorted(n)}

    step, t0, losses = 0, time.time(), []
    while step < a.steps:
        for b in train:
            out = model(b.get("inputs", {}), b["features"])
            loss = task.masked_loss(out.logits["answer"], b["labels"]["answer"], b["masks"]["answer"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if step % a.eval_every == 0 or step == a.steps:
                recent = losses[-100:]
                print(step, f"{time.time() - t0:.0f}s", f"loss {sum(recent) / len(recent):.3f}", evaluate(), flush=True)
            if step >= a.steps:
                break


if __name__ == "__main__":
    main()
