"""The modality-balancing experiment of issue 12: no balancing vs OGM-GE (three alphas) vs AGM, seeds, settings.

Every run is a plain `mmfuse train` (a subprocess), written under `--root/<setting>/<method>-s<seed>/`; a run
whose folder already holds `metrics.json` is not retrained, so the script can be stopped and started again.
`--summarise` reads the finished runs only and writes the table (markdown, to stdout and `--table`), the raw
numbers (`--json`) and two plots (`--plots`): accuracies per method, and each modality's coefficient over the
training steps.

Settings (all with a FiLM fusion conditioned on the text: fused = fc_out(gamma(text) * W(image) + beta(text)),
which is not additive in the modalities, and only the `answer` task, which the balancers score):
- `evqa_frozen`: easy-VQA, EfficientNet-Lite0 (packaged ImageNet weights, 128 px) and MiniLM both frozen,
  features cached; the balancers act on the fusion's per-modality adapters (`adapters: true`). 8,000 records,
  3 epochs (the full set and budget saturate at 99.7 % without any balancer).
- `evqa_train`: easy-VQA, a ResNet-18 image encoder trained from scratch (32 px), MiniLM frozen and cached;
  the balancers act on the image encoder + its adapter and on the text side's FiLM generator. 3,000 records,
  4 epochs (a budget that fits a 2-core CPU).
- `rel_frozen` / `rel_train`: the same two on the relations set (`mmfuse data relations --out
  data/relations` first), where the image carries what the question asks about; `rel_frozen` uses 8,000
  records and 4 epochs, `rel_train` 32 px, 3,000 records and 4 epochs.

Methods: `none` (OGM-GE with alpha 0 and no noise: k = 1 always, the same linear probes logged, so the
baseline differs from the others only in the modulation), `ogm0.1`, `ogm0.5`, `ogm0.8` (OGM-GE with GE
noise, Peng et al. CVPR 2022), `ogm0.5-no-ge` (the modulation alone, without the GE noise: separates the two
effects) and `agm` (Li et al. ICCV 2023, alpha 1).

    python benchmarks/balancing.py --root runs/balancing                 # everything (hours on 2 CPU cores)
    python benchmarks/balancing.py --root runs/balancing --only evqa_frozen --seeds 0 1 2
    python benchmarks/balancing.py --root runs/balancing --summarise \
        --json benchmarks/results/balancing.json --plots docs/img
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

FILM = "model.fusion={name: film, output_dim: 512, condition_on: text, adapters: true}"
# setting -> (config, --set overrides)
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "evqa_frozen": (
        "src/mmfuse/configs/easy_vqa.yaml",
        ["tasks={answer: {kind: multiclass}}", FILM, "data.limit=8000", "train.max_epochs=3"],
    ),
    "evqa_train": (
        "src/mmfuse/configs/easy_vqa_ogm_ge.yaml",
        ["model.encoders.image.image_size=32", "data.limit=3000", "train.max_epochs=4"],
    ),
    "rel_frozen": (
        "configs/relations.yaml",
        ["tasks={answer: {kind: multiclass}}", FILM, "data.limit=8000", "train.max_epochs=4"],
    ),
    "rel_train": (
        "configs/relations.yaml",
        [
            "tasks={answer: {kind: multiclass}}",
            "model.encoders.image={name: torchvision, model: resnet18, image_size: 32}",
            "model.fusion={name: film, output_dim: 256, condition_on: text, adapters: true}",
            "data.limit=3000",
            "data.batch_size=64",
            "train.max_epochs=4",
            "train.lr=0.001",
            "train.encoder_lr=0.001",
        ],
    ),
}
METHODS: dict[str, str] = {
    "none": "{name: ogm_ge, alpha: 0.0, noise: false}",
    "ogm0.1": "{name: ogm_ge, alpha: 0.1}",
    "ogm0.5": "{name: ogm_ge, alpha: 0.5}",
    "ogm0.8": "{name: ogm_ge, alpha: 0.8}",
    "ogm0.5-no-ge": "{name: ogm_ge, alpha: 0.5, noise: false}",
    "agm": "{name: agm}",
}
MODALITIES = ("image", "text")


def run_one(root: Path, setting: str, method: str, seed: int) -> tuple[Path, float | None]:
    """Train one run unless it is finished; (its folder, seconds spent or None when skipped)."""
    out = root / setting / f"{method}-s{seed}"
    if (out / "metrics.json").exists():
        return out, None
    config, overrides = SETTINGS[setting]
    cmd = [sys.executable, "-m", "mmfuse.cli", "train", config]
    for item in [*overrides, f"train.balance={METHODS[method]}", f"seed={seed}"]:
        cmd += ["--set", item]
    cmd += ["--out", str(out)]
    if out.exists() and (out / "checkpoints" / "last.ckpt").exists():
        cmd.append("--resume")
    start = time.monotonic()
    with open(root / f"{setting}-{method}-s{seed}.log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"balancing.py: error: {' '.join(cmd)} exited {code}; see its log under {root}")
    return out, time.monotonic() - start


def coefficients(run: Path) -> dict[str, list[tuple[int, float]]]:
    """{modality: [(step, k)]} from the run's logs/metrics.csv."""
    series: dict[str, list[tuple[int, float]]] = {m: [] for m in MODALITIES}
    with open(run / "logs" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for m in MODALITIES:
                value = row.get(f"balance/coef/{m}", "")
                if value:
                    series[m].append((int(row["step"]), float(value)))
    return series


def read_run(run: Path) -> dict:
    test = json.loads((run / "metrics.json").read_text())["metrics"]["test"]

    def pick(group: str, key: str) -> float:
        return float(test.get(group, {}).get(key, math.nan))

    coef = coefficients(run)
    return {
        "accuracy": pick("answer", "accuracy"),
        "image_probe": pick("unimodal", "image_accuracy"),
        "text_probe": pick("unimodal", "text_accuracy"),
        "mean_coef": {m: (statistics.fmean(k for _, k in s) if s else math.nan) for m, s in coef.items()},
        "coef": coef,
    }


def mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * sd:.2f}"


def summarise(root: Path, table: Path | None, out_json: Path | None, plots: Path | None) -> None:
    results: dict[str, dict[str, list[dict]]] = {}
    for setting in SETTINGS:
        for method in METHODS:
            runs = sorted((root / setting).glob(f"{method}-s*/metrics.json"))
            if runs:
                results.setdefault(setting, {})[method] = [read_run(r.parent) | {"run": str(r.parent)} for r in runs]
    lines = [
        "| setting | method | seeds | answer accuracy (%) | image probe (%) | text probe (%) "
        "| mean k image | mean k text |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting, methods in results.items():
        for method, runs in methods.items():
            k = {m: statistics.fmean(r["mean_coef"][m] for r in runs) for m in MODALITIES}
            lines.append(
                f"| {setting} | {method} | {len(runs)} | {mean_std([r['accuracy'] for r in runs])} | "
                f"{mean_std([r['image_probe'] for r in runs])} | {mean_std([r['text_probe'] for r in runs])} | "
                f"{k['image']:.3f} | {k['text']:.3f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if table:
        table.write_text(text)
    if out_json:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        slim = {
            s: {m: [{k: v for k, v in r.items() if k != "coef"} for r in rs] for m, rs in ms.items()}
            for s, ms in results.items()
        }
        out_json.write_text(json.dumps(slim, indent=1) + "\n")
    if plots:
        draw(results, plots)


def draw(results: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    settings = list(results)
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        methods = list(results[setting])
        for j, key in enumerate(("accuracy", "image_probe", "text_probe")):
            means, errs = [], []
            for method in methods:
                vals = [r[key] for r in results[setting][method] if not math.isnan(r[key])]
                means.append(100 * statistics.fmean(vals) if vals else 0.0)
                errs.append(100 * statistics.stdev(vals) if len(vals) > 1 else 0.0)
            xs = [i + (j - 1) * 0.27 for i in range(len(methods))]
            ax.bar(xs, means, width=0.27, yerr=errs, capsize=2, label=key.replace("_", " "))
        ax.set_xticks(range(len(methods)), methods, rotation=30)
        ax.set_title(setting)
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(folder / "balancing_accuracy.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(settings), figsize=(4.2 * len(settings), 5.6), squeeze=False, sharex="col")
    for col, setting in enumerate(settings):
        for row, m in enumerate(MODALITIES):
            ax = axes[row][col]
            for method, runs in results[setting].items():
                if method == "none":
                    continue
                series = runs[0]["coef"][m]  # seed 0: one curve per method (the seeds look alike)
                if series:
                    color = f"C{list(METHODS).index(method)}"  # one colour per method in every panel
                    ax.plot([s for s, _ in series], [k for _, k in series], label=method, lw=1, marker=".", color=color)
            ax.set_title(f"{setting}: k_{m} (epoch means, seed 0)")
            ax.set_yscale("log")
            if row == 1:
                ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "balancing_coefficients.png", dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("runs/balancing"))
    p.add_argument("--only", nargs="*", choices=list(SETTINGS), help="settings to run (default: all)")
    p.add_argument("--methods", nargs="*", choices=list(METHODS), help="methods to run (default: all)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--summarise", action="store_true", help="summarise the finished runs instead of training")
    p.add_argument("--table", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--plots", type=Path)
    args = p.parse_args()
    if args.summarise:
        summarise(args.root, args.table, args.json, args.plots)
        return 0
    args.root.mkdir(parents=True, exist_ok=True)
    for setting in args.only or SETTINGS:
        for seed in args.seeds:
            for method in args.methods or METHODS:
                out, spent = run_one(args.root, setting, method, seed)
                acc = read_run(out)["accuracy"]
                took = "finished before" if spent is None else f"{spent:.0f} s"
                print(f"{setting} {method} seed {seed}: answer accuracy {acc:.4f} ({took})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
