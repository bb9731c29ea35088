"""Synthetic records for the data-scale benchmarks: a table row (4 numbers, 1 category) and a 16-d embedding per
record, a 5-class label and a regression target that depend on both. No images or texts: records only.

    python benchmarks/synth_data.py --n 100000 --out /tmp/synth   # writes /tmp/synth/records.jsonl and config.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

DIM = 16


def write_records(path: Path, n: int, seed: int = 0, block: int = 50_000) -> Path:
    """`n` JSONL records written in blocks (memory stays flat whatever `n`)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(DIM + 4, 5))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for start in range(0, n, block):
            m = min(block, n - start)
            emb = rng.normal(size=(m, DIM)).round(4)
            num = rng.normal(size=(m, 4)).round(3)
            cat = rng.integers(0, 6, size=m)
            logits = np.concatenate([emb, num], axis=1) @ w
            label = logits.argmax(1)
            target = (emb[:, 0] + num[:, 1] + 0.1 * rng.normal(size=m)).round(4)
            for i in range(m):
                row = {
                    "emb": emb[i].tolist(),
                    "a": num[i, 0],
                    "b": num[i, 1],
                    "c": num[i, 2],
                    "d": num[i, 3],  # fmt: skip
                    "kind": f"k{cat[i]}",
                    "label": f"c{label[i]}",
                    "target": target[i],
                }
                f.write(json.dumps(row, default=float) + "\n")
    return path


def config(records: Path, batch_size: int = 256) -> dict[str, Any]:
    """A table + embedding run over `records` (1 epoch, CPU, a fixed seed)."""
    return {
        "name": "synth",
        "seed": 0,
        "model": {
            "encoders": {
                "table": {"name": "tabular", "numeric": ["a", "b", "c", "d"], "categorical": ["kind"], "dim": 16},
                "emb": {"name": "embedding", "dim": DIM},
            },
            "fusion": {"name": "concat", "output_dim": 32},
        },
        "tasks": {"label": {"kind": "multiclass"}, "target": {"kind": "regression"}},
        "data": {
            "source": "records",
            "path": str(records),
            "val_fraction": 0.01,
            "batch_size": batch_size,
            "eval_batch_size": 1024,
            "num_workers": 0,
        },
        "train": {"max_epochs": 1, "accelerator": "cpu", "progress_bar": False, "cache": False},
    }


def main() -> None:
    import yaml

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    records = write_records(args.out / "records.jsonl", args.n, args.seed)
    (args.out / "config.yaml").write_text(yaml.safe_dump(config(records)))
    print(f"{args.n} records -> {records}; config: {args.out / 'config.yaml'}")


if __name__ == "__main__":
    main()
