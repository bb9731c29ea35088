"""Fine-tuning the image encoder on easy-VQA: one encoder pass per record (before) vs one per distinct image.

Model: `src/mmfuse/configs/easy_vqa_ogm_ge.yaml` without the balancer: a ResNet-18 from scratch at 64x64 (trained),
MiniLM frozen (features cached), FiLM conditioned on the text, the `answer` task. Data: every question of the
first `--images` training images (easy-VQA asks about 8 questions per image; a `data.limit` would shuffle the
records and break that sharing), validated on every question of `--images / 4` validation images.

Three sides, each a deep copy of one initialisation, trained with the same loop (mmfuse's training step without
Lightning: forward through the batch contract, masked per-task losses, backward, clip 1.0, fused AdamW at the
config's learning rates), fed by mmfuse's own `make_loader` with its default workers:

- before: `make_loader(..., dedupe=False)`, uniform shuffled batches: what mmfuse did until now.
- dedupe: each distinct input of a batch loaded and encoded once, uniform batches.
- dedupe + group_batches: the same, batches that keep the questions of an image together.

Rounds alternate the sides (the order rotates) one epoch at a time, so load bursts on a shared machine hit all
three; records/s are medians over the epochs with the per-epoch range; accuracy is the validation `answer`
accuracy after the same number of epochs. Run from the repository root:

    PYTHONPATH=src python benchmarks/bench_dedupe.py --images 300 --epochs 3
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mmfuse.builders import LoaderOptions  # noqa: E402
from mmfuse.config import load_config  # noqa: E402
from mmfuse.train.data import Features, make_loader  # noqa: E402
from mmfuse.train.run import Run  # noqa: E402

SIDES = {"before": (False, False), "dedupe": (True, False), "dedupe + group_batches": (True, True)}
CONFIG = "src/mmfuse/configs/easy_vqa_ogm_ge.yaml"


def subset(records: list, n_images: int) -> list:
    """Every record of the first `n_images` distinct images (in file order)."""
    keep = list(dict.fromkeys(r.inputs["image"] for r in records))[:n_images]
    chosen = set(keep)
    return [r for r in records if r.inputs["image"] in chosen]


class Side:
    """One side: its model copy, optimiser and training loader; the encoder rows it ran."""

    def __init__(self, run: Run, feats: Features, dedupe: bool, grouped: bool, options: LoaderOptions) -> None:
        self.model = copy.deepcopy(run.model)
        options = dataclasses.replace(options, group_batches=grouped)
        self.loader = make_loader(self.model, run.splits["train"], "train", feats, options, dedupe=dedupe)
        self.val = make_loader(self.model, run.splits["val"], "val", feats, options)
        t = run.cfg.train
        self.opt = torch.optim.AdamW(
            [
                {"params": self.model.trainable_parameters("encoders"), "lr": t.encoder_lr},
                {"params": self.model.trainable_parameters("head"), "lr": t.lr},
            ],
            weight_decay=t.weight_decay,
            fused=True,  # as mmfuse's module
        )
        self.rows = 0
        self.model.encoders["image"].register_forward_pre_hook(self._count)
        self.speeds: list[float] = []

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        if module.training:
            self.rows += len(args[0])

    def epoch(self) -> None:
        self.model.train()
        n, t0 = 0, time.perf_counter()
        for batch in self.loader:
            out = self.model(batch["inputs"], batch.get("features"), batch["absent"] or None)
            losses = self.model.losses(out.logits, batch["labels"], batch["masks"])
            loss = sum(losses.values())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            n += len(batch["index"])
        self.speeds.append(n / (time.perf_counter() - t0))

    @torch.no_grad()
    def accuracy(self) -> float:
        self.model.eval()
        right = total = 0
        for batch in self.val:
            out = self.model(batch["inputs"], batch.get("features"), batch["absent"] or None)
            mask = batch["masks"]["answer"]
            right += int((out.logits["answer"].argmax(-1)[mask] == batch["labels"]["answer"][mask]).sum())
            total += int(mask.sum())
        return right / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300, help="training images (all of their questions)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(CONFIG, ["train.progress_bar=false"])
    cfg.train.balance, cfg.data.limit = None, None  # a limit would shuffle the records apart from their images
    run = Run(cfg)
    run.splits = {"train": subset(run.splits["train"], args.images), "val": subset(run.splits["val"], args.images // 4)}
    feats = run.prepare()
    sides = {name: Side(run, feats, dedupe, grouped, run.loader_options) for name, (dedupe, grouped) in SIDES.items()}
    names = list(sides)
    for r in range(args.epochs):
        for name in names[r % 3 :] + names[: r % 3]:
            sides[name].epoch()
            print(f"epoch {r + 1} {name}: {sides[name].speeds[-1]:.1f} records/s", flush=True)
    n_train = len(run.splits["train"])
    n_images = len({rec.inputs["image"] for rec in run.splits["train"]})
    print(
        f"\n{n_train} training records of {n_images} images, {len(run.splits['val'])} validation records, "
        f"batch {cfg.data.batch_size}, {args.epochs} epochs, {torch.get_num_threads()} threads, "
        f"load average at the end {os.getloadavg()[0]:.1f}"
    )
    base = statistics.median(sides["before"].speeds)
    print("| side | records/s (median) | per-epoch range | x before | image rows per record | val accuracy |")
    print("|---|---|---|---|---|---|")
    for name, s in sides.items():
        med = statistics.median(s.speeds)
        ratios = [a / b for a, b in zip(s.speeds, sides["before"].speeds)]
        print(
            f"| {name} | {med:.1f} | {min(s.speeds):.1f}-{max(s.speeds):.1f} | {med / base:.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f} per epoch) | {s.rows / (n_train * args.epochs):.3f} | "
            f"{s.accuracy():.2%} |"
        )


if __name__ == "__main__":
    main()
