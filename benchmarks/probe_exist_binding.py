"""Probe: how fast do the `conv` encoder and `spatial_film` learn to bind a colour to a shape, with a perfect question?

Trains the conv encoder (4 blocks [32, 64, 64, 64], stride 2, GroupNorm: a 4 x 4 grid at 64 px) and spatial_film
(width 64, 4 blocks, classifier 256) plus an MLP head on the questions of one type of a generated relations set,
the question given as a one-hot vector of its colours, shapes and relation word (no text encoder), Adam, batch 64,
one thread, seed 0; prints the validation accuracy every 500 steps.

Usage: python benchmarks/probe_exist_binding.py --data data/relations20k --lr 3e-4 --type exist --steps 3000
(the data from `mmfuse data relations --out data/relations20k --train-images 20000`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmfuse.encoders.base import EncoderOutput
from mmfuse.encoders.conv import ConvImageEncoder
from mmfuse.fusion.spatial_film import SpatialFiLMFusion

COLORS, SHAPES = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
RELATIONS = ["left", "right", "above", "below"]


def load(root: Path, split: str, qtype: str, limit: int) -> tuple[list[dict], torch.Tensor, dict[str, int]]:
    """The split's questions of one type, and their images once each as uint8 (N, 3, 64, 64)."""
    records = [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]
    records = [r for r in records if r["question_type"] == qtype][:limit]
    paths = sorted({r["image"] for r in records})
    images = np.stack([np.asarray(Image.open(root / p).convert("RGB")) for p in paths])
    return records, torch.from_numpy(images).permute(0, 3, 1, 2), {p: i for i, p in enumerate(paths)}


def one_hot(text: str) -> torch.Tensor:
    """(24,): first object's colour and shape at 0-6, relation word at 8-11, second object's at 12-18."""
    v, k = torch.zeros(24), 0
    for word in text.replace("?", "").split():
        if word in COLORS:
            v[k * 12 + COLORS.index(word)] = 1
        if word in SHAPES:
            v[k * 12 + 4 + SHAPES.index(word)] = 1
            k = 1
        if word in RELATIONS:
            v[8 + RELATIONS.index(word)] = 1
    return v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--type", default="exist")
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train, train_images, train_index = load(args.data, "train", args.type, 30000)
    val, val_images, val_index = load(args.data, "val", args.type, 2000)
    answers = {a: i for i, a in enumerate(sorted({r["answer"] for r in train}))}
    print(f"{len(train)} train, {len(val)} val questions; answers {list(answers)}", flush=True)
    encoder = ConvImageEncoder(image_size=64, depth=4, width=[32, 64, 64, 64], stride=2, norm="group")
    fusion = SpatialFiLMFusion({"image": 64, "text": 24}, 256, width=64, num_blocks=4, classifier_channels=256)
    head = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, len(answers)))
    modules = torch.nn.ModuleList([encoder, fusion, head])
    optimizer = torch.optim.Adam(modules.parameters(), lr=args.lr)

    def batch(records, images, index, rows):  # (B, 3, 64, 64) in [-1, 1], (B, 24), (B,)
        x = images[[index[records[i]["image"]] for i in rows]].float() / 127.5 - 1
        q = torch.stack([one_hot(records[i]["text"]) for i in rows])
        return x, q, torch.tensor([answers.get(records[i]["answer"], 0) for i in rows])

    def logits(x, q):
        return head(fusion({"image": encoder(x), "text": EncoderOutput(pooled=q)}).fused)

    def accuracy() -> float:
        modules.eval()
        right = 0
        with torch.no_grad():
            for start in range(0, len(val), 256):
                x, q, y = batch(val, val_images, val_index, range(start, min(len(val), start + 256)))
                right += int((logits(x, q).argmax(1) == y).sum())
        modules.train()
        return right / len(val)

    t0, step = time.time(), 0
    while step < args.steps:
        order = torch.randperm(len(train)).tolist()
        for start in range(0, len(train) - 63, 64):
            x, q, y = batch(train, train_images, train_index, order[start : start + 64])
            loss = torch.nn.functional.cross_entropy(logits(x, q), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 500 == 0:
                print(f"step {step} loss {loss.item():.3f} val {accuracy():.3f} ({time.time() - t0:.0f} s)", flush=True)
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
