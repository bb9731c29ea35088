"""Does a frozen, mean-pooled MiniLM vector keep the word order a relation question needs?

For every relation question of the relations set ("is the A B left of the C D?"), encode it with the
frozen MiniLM of `configs/relations.yaml` (mean pooling, max_length 32), then:
- the cosine between a question and its swapped form ("is the C D left of the A B?");
- linear probes (logistic regression, half the questions to fit, half to score) that read the first object's
  colour, the second object's colour and the relation word back from the pooled vector.

Usage: python benchmarks/probe_question_order.py --data data/relations
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from mmfuse.encoders.hf_text import HFTextEncoder

RELATION = re.compile(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/relations", help="the generated relations folder")
    args = parser.parse_args()
    files = [Path(args.data) / f"{split}.jsonl" for split in ("train", "test")]
    texts = sorted({json.loads(line)["text"] for f in files for line in f.read_text().splitlines()})
    relation = [t for t in texts if RELATION.fullmatch(t)]
    enc = HFTextEncoder(model="minilm", pooling="mean", max_length=32, freeze=True).eval()
    with torch.no_grad():
        pooled = enc(enc.collate(relation)).pooled.numpy()  # (N, 384)
    parts = [RELATION.fullmatch(t).groups() for t in relation]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(relation))
    fit, score = order[: len(order) // 2], order[len(order) // 2 :]
    print(f"{len(relation)} distinct relation questions ({len(texts)} texts in train + test)")
    for name, k in (("first object's colour", 0), ("second object's colour", 3), ("relation word", 2)):
        y = np.array([p[k] for p in parts])
        probe = LogisticRegression(max_iter=5000).fit(pooled[fit], y[fit])
        print(f"linear probe, {name}: {probe.score(pooled[score], y[score]):.1%} of held-out questions")
    index = {t: v for t, v in zip(relation, pooled)}
    cos = []
    for (c1, s1, rel, c2, s2), v in zip(parts, pooled):
        swapped = index.get(f"is the {c2} {s2} {rel} the {c1} {s1}?")
        if swapped is not None:
            cos.append(float(v @ swapped / np.linalg.norm(v) / np.linalg.norm(swapped)))
    print(f"cosine(question, swapped question): mean {np.mean(cos):.4f}, min {np.min(cos):.4f} over {len(cos)}")


if __name__ == "__main__":
    main()
