"""5. scaling: cached-feature epochs at 1x, 4x and 16x the data, and cross-attention fusion at text lengths 16/64/256.

Data size: each size runs in its own process (so its peak RSS, `VmHWM`, is its own): easy-VQA train
records repeated 1x/4x/16x, both encoders frozen and cached (the cache is filled once beforehand, so no
run encodes anything), `make_loader` + MMFuseModule + mmfuse's Trainer for 2 epochs; the second is timed.
Linear growth = a flat per-sample cost of the epoch's batches (the fixed per-epoch checkpoint is shown
apart). Memory: peak RSS, and how much the epochs themselves add to it (the records and their labels
are in memory once; features are per distinct input).

Text length: the cross-attention fusion (image pooled query over text tokens, 4 heads, 256-d) trained on
cached token features (FeatureTable.gather re-pads each batch) of T = 16, 64 and 256 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common import (
    BATCH,
    TASK,
    Result,
    Row,
    Settings,
    Target,
    build_reference,
    fmt,
    interleave,
    lightning_callbacks,
    loop_runner,
    max_rss_mb,
    mmfuse_trainer,
    model_config,
    now,
    setup,
    to_device,
)

FACTORS = (1, 4, 16)
LENGTHS = (16, 64, 256)
HERE = Path(__file__).resolve().parent


def config(s_device: torch.device, base: int, cache_dir: str) -> Any:
    from mmfuse.config import parse_config

    return parse_config(
        model_config(True, device=s_device, data={"limit": base}, train={"max_epochs": 2, "cache_dir": cache_dir})
    )


def prepared_run(cfg: Any, factor: int) -> Any:
    from mmfuse.train.run import Run

    torch.manual_seed(0)  # the same random resnet18 weights, hence the same cache key, in every process
    run = Run(cfg)
    run.splits = {"train": run.splits["train"] * factor}
    return run


def child(argv: list[str]) -> None:
    """One data size in this process: prints a JSON line with epoch times and memory."""
    p = argparse.ArgumentParser()
    p.add_argument("--factor", type=int)
    p.add_argument("--base", type=int)
    p.add_argument("--cache-dir")
    p.add_argument("--workdir")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    device = setup(a.device)
    from mmfuse.train.data import make_loader

    run = prepared_run(config(device, a.base, a.cache_dir), a.factor)
    feats = run.prepare()
    loader = make_loader(run.model, run.splits["train"], "train", feats, run.loader_options)
    module = run.module()
    rss_before = max_rss_mb()
    _, EpochClock = lightning_callbacks()
    clock = EpochClock(device)
    trainer = mmfuse_trainer(run.cfg, Path(a.workdir), [clock])
    trainer.fit(module, loader)
    end = now(device)
    out = {
        "factor": a.factor,
        "records": len(run.splits["train"]),
        "epoch_s": end - clock.starts[1],  # the second epoch, checkpoint and fit's teardown included
        "epoch_train_s": clock.train_only[1],  # the second epoch's batches alone (start to end of epoch hooks)
        "first_epoch_s": clock.starts[1] - clock.starts[0],
        "train_part_s": clock.train_only,
        "rss_before_fit_mb": rss_before,
        "peak_rss_mb": max_rss_mb(),
    }
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def data_sizes(s: Settings) -> list[dict[str, Any]]:
    from mmfuse.train.run import Run  # noqa: F401  (fails here, not in a child, if mmfuse is broken)

    base = 512 if s.quick else 4096
    cache_dir = str(s.workdir / "fc")
    run = prepared_run(config(s.device, base, cache_dir), 1)
    run.prepare()  # fill the cache once; the children only read it
    del run
    out = []
    for f in FACTORS:
        cmd = [
            sys.executable,
            str(HERE / "bench_scaling.py"),
            "--child",
            f"--factor={f}",
            f"--base={base}",
            f"--cache-dir={cache_dir}",
            f"--workdir={s.workdir / f'x{f}'}",
            f"--device={s.device.type}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise RuntimeError(f"scaling child x{f} failed: {proc.stderr[-2000:]}")
        out.append(json.loads(line[len("RESULT ") :]))
    return out


def child_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def cross_attention(s: Settings) -> dict[int, Any]:
    """Step time of the cross-attention model on cached features with T text tokens per sample."""
    fusion = {"name": "cross_attention", "output_dim": 256, "direction": "image_to_text", "num_heads": 4}
    model = build_reference(freeze=True, fusion=fusion).to(s.device)
    model.train()
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 1024, 512
    image = table({"pooled": torch.randn(n_img, 512, generator=g)})
    runners = {}
    for t in LENGTHS:
        text = table(
            {
                "pooled": torch.randn(n_txt, 384, generator=g),
                "tokens": torch.randn(n_txt * t, 384, generator=g),
                "offsets": torch.arange(0, (n_txt + 1) * t, t),
            }
        )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        runners[t] = loop_runner(_ca_step(model, opt, image, text, s.device), s.device)
    m = interleave(runners, BATCH, s.rounds(3), 2, s.steps(20, 5))
    return m


def table(shard: dict[str, torch.Tensor]) -> Any:
    """A one-shard FeatureTable (the layout FeatureCache loads from disk) over synthetic features."""
    from mmfuse.data.cache import FeatureTable

    n = shard["pooled"].shape[0]
    return FeatureTable([shard], torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], dim=1))


def _ca_step(model: Any, opt: Any, image: Any, text: Any, device: torch.device) -> Any:
    def step(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        img_rows = torch.randint(len(image), (BATCH,), generator=g)
        txt_rows = torch.randint(len(text), (BATCH,), generator=g)
        feats = to_device({"image": image.gather(img_rows), "text": text.gather(txt_rows)}, device)
        labels = torch.randint(13, (BATCH,), generator=g).to(device)
        loss = F.cross_entropy(model({}, features=feats).logits[TASK], labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(s: Settings) -> Result:
    t0 = time.perf_counter()
    sizes = data_sizes(s)
    res = Result("scaling")
    base = sizes[0]
    for d in sizes:
        per = 1e6 * d["epoch_train_s"] / d["records"]
        res.rows.append(
            Row(
                f"cached epoch, {d['factor']}x data ({d['records']} records)",
                per,
                "us/sample",
                f"{fmt(per / (1e6 * base['epoch_train_s'] / base['records']))}x the 1x cost",
                f"batches {d['epoch_train_s']:.2f} s (whole epoch with checkpoint {d['epoch_s']:.2f} s), "
                f"peak RSS {d['peak_rss_mb']:.0f} MB (+{d['peak_rss_mb'] - d['rss_before_fit_mb']:.0f} MB in fit)",
            )
        )
    big = sizes[-1]
    per_ratio = (big["epoch_train_s"] / big["records"]) / (base["epoch_train_s"] / base["records"])
    rss_ratio = big["peak_rss_mb"] / base["peak_rss_mb"]
    per_record_kb = 1024 * (big["peak_rss_mb"] - base["peak_rss_mb"]) / max(big["records"] - base["records"], 1)
    res.targets += [
        Target("scaling: per-sample epoch cost at 16x <= 1.2x the 1x cost (linear)", per_ratio, 1.2, per_ratio <= 1.2),
        Target(
            "scaling: peak RSS at 16x <= 1.1x the 1x peak",
            rss_ratio,
            1.1,
            rss_ratio <= 1.1,
            detail=f"{per_record_kb:.2f} KB per extra record",
        ),
    ]
    data_s = time.perf_counter() - t0
    m = cross_attention(s)
    t16 = m[LENGTHS[0]].median
    for t in LENGTHS:
        med = m[t].median
        res.rows.append(
            Row(
                f"cross-attention fusion step, T={t}",
                1e6 * med / BATCH,
                "us/sample",
                f"{fmt(med / t16)}x T=16",
                f"{1000 * med:.2f} ms/step, cached features, fusion + head trained",
            )
        )
    growth = m[LENGTHS[-1]].median / t16
    res.targets.append(
        Target("scaling: cross-attention step at T=256 <= 16x T=16 (at most linear in T)", growth, 16.0, growth <= 16.0)
    )
    res.info = {
        "sizes": sizes,
        "data_sizes_s": data_s,
        "cross_attention_step_s": {str(t): m[t].times for t in LENGTHS},
        "per_record_kb": per_record_kb,
    }
    return res


if __name__ == "__main__" and "--child" in sys.argv:
    child([a for a in sys.argv[1:] if a != "--child"])
