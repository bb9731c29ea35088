"""Which read-out of the token fusions can compare two tokens: `mean`, `query` (learned queries) or `cls`.

The task (synthetic, made so that the answer is a comparison of two image tokens): the image is a 4 x 4 grid of
noise tokens (8-d) with two marked cells, A (+2 on channel 0) and B (+2 on channel 1); the text is a two-token
question (4-d) whose first token says which relation is asked, "is A left of B?" or "is A above B?". The label is
the answer; A and B are drawn in different columns for the first question and in different rows for the second, so
both answers are equally likely (chance: 50%).

The fusion (`output_dim` 32) and one linear layer to the 2 logits are trained (so the classifier is a linear map
of the read-out), with AdamW, batches of 128 fresh samples, for `--steps` steps; the score is the accuracy on 2,000
fresh samples. A mean of a stream holds A's and B's places as one sum, which no linear map can turn into "A's column
< B's column" unless the layers before it have put the two places into different channels (here they can: A and B
carry different marks, so each token's feed-forward layer can route its own place) or the comparison itself into
a token; a read-out that picks A's and B's tokens apart (a head each, or a CLS that attends to them) hands both
places to the linear map, which can compare them. co_attention: d 32, 2 layers, 2 heads, self-attention;
cross_attention: the question's tokens query the image tokens, 2 heads.

    .venv/bin/python benchmarks/bench_readout.py                 # seeds 0-2, about 2 minutes of one core
    .venv/bin/python benchmarks/bench_readout.py --seeds 0 --steps 200

Prints one line per run and a table of accuracy per fusion and read-out (mean and each seed); asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.co_attention import CoAttentionFusion
from mmfuse.fusion.cross_attention import CrossAttentionFusion

GRID = 4
DIMS = {"image": 8, "text": 4}
OUT = 32
SMALL = {"num_heads": 2}
CO = {"hidden_dim": 32, "num_layers": 2, "ffn_dim": 64}
# (fusion, read-out): cross_attention has no `cls` (its queries never attend to each other).
SETUPS = [
    ("co_attention", "mean"),
    ("co_attention", "query"),
    ("co_attention", "cls"),
    ("cross_attention", "mean"),
    ("cross_attention", "query"),
]


def sample(n: int, g: torch.Generator) -> tuple[dict[str, EncoderOutput], torch.Tensor]:
    """n scenes and questions: image (n, 16, 8) tokens, text (n, 2, 4) tokens, labels (n,)."""
    question = torch.randint(0, 2, (n,), generator=g)  # 0: "is A left of B?", 1: "is A above B?"
    a = torch.randint(0, GRID, (n, 2), generator=g)  # (row, col) of A
    # B differs from A in the asked coordinate (so the answer is never a tie), anything in the other.
    b = torch.randint(0, GRID, (n, 2), generator=g)
    asked = torch.stack([question == 1, question == 0], dim=1)  # (n, 2): which of (row, col) is asked
    shift = torch.randint(1, GRID, (n, 2), generator=g)
    b = torch.where(asked, (a + shift) % GRID, b)
    rows = torch.arange(n)
    image = 0.3 * torch.randn(n, GRID * GRID, DIMS["image"], generator=g)
    image[rows, a[:, 0] * GRID + a[:, 1], 0] += 2.0
    image[rows, b[:, 0] * GRID + b[:, 1], 1] += 2.0
    text = 0.05 * torch.randn(n, 2, DIMS["text"], generator=g)
    text[rows, 0, question] += 1.0
    text[:, 1, 3] += 1.0
    label = torch.where(question == 0, a[:, 1] < b[:, 1], a[:, 0] < b[:, 0]).long()
    features = {"image": EncoderOutput(image.mean(1), image), "text": EncoderOutput(text.mean(1), text)}
    return features, label


def build(fusion: str, readout: str) -> nn.Module:
    if fusion == "co_attention":
        return CoAttentionFusion(DIMS, OUT, readout=readout, **CO, **SMALL)
    return CrossAttentionFusion(DIMS, OUT, direction="text_to_image", query="tokens", readout=readout, **SMALL)


class Classifier(nn.Module):
    """The fusion, then a linear layer to the 2 logits."""

    def __init__(self, fusion: nn.Module) -> None:
        super().__init__()
        self.fusion = fusion
        self.out = nn.Linear(fusion.output_dim, 2)

    def forward(self, features: dict[str, EncoderOutput]) -> torch.Tensor:
        return self.out(self.fusion(features).fused)


def accuracy(fusion: str, readout: str, seed: int, steps: int) -> float:
    torch.manual_seed(seed)
    model = Classifier(build(fusion, readout))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        features, labels = sample(128, g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(features), labels).backward()
        opt.step()
    features, labels = sample(2000, torch.Generator().manual_seed(1000 + seed))
    with torch.no_grad():
        return (model.eval()(features).argmax(dim=1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[tuple[str, str], list[float]] = {}
    for fusion, readout in SETUPS:
        for seed in args.seeds:
            start = time.perf_counter()
            acc = accuracy(fusion, readout, seed, args.steps)
            results.setdefault((fusion, readout), []).append(acc)
            print(f"{fusion:16s} readout={readout:6s} seed={seed} acc={acc:.4f} ({time.perf_counter() - start:.1f} s)")
    print(f"\n{args.steps} steps of 128, test on 2,000 fresh samples; chance 0.5")
    print("| fusion | readout | mean acc. | per seed |\n|---|---|---:|---|")
    for (fusion, readout), accs in results.items():
        mean = statistics.mean(accs)
        print(f"| {fusion} | {readout} | {mean:.4f} | {' / '.join(f'{a:.4f}' for a in accs)} |")


if __name__ == "__main__":
    main()
