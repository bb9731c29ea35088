"""5. scaling: cached-feature epochs at 1x, 4x and 16x the data, and cross-attention fusion at text lengths 16/64/256.

Data size: the first 1x/4x/16x `base` records of easy-VQA's training split (a seeded shuffle), each question made
DISTINCT by a record number appended to its text (easy-VQA's questions repeat: without this the text cache would
not grow with the data); the images are easy-VQA's own, so their count grows until the split's images are all in
(the distinct counts are reported). Both encoders frozen and cached: the parent fills the cache once for the
largest size, so no child encodes anything. Each (size, round) runs in its own process, the sizes in rotating
order each round, so its peak RSS (`VmHWM`) is its own: `make_loader` + MMFuseModule + mmfuse's Trainer for 2
epochs; the second is timed (its batches alone; the whole epoch with checkpoint apart). Linear growth = a flat
per-sample cost.

Memory: each child reads its resident set (`/proc/self/status`: VmRSS = RssAnon + RssFile + RssShmem) after the
imports, after the records and model are built, after the cache is opened, after the loader is built and after
`fit`, and sums the resident pages of the cache's memory-mapped safetensors files (`/proc/self/smaps`); the
model's parameters and buffers are counted from the tensors. What the rest is (the interpreter, torch's and the
other libraries' code pages, Python objects) follows from the stages.

Text length: the cross-attention fusion (image pooled query over text tokens, 4 heads, 256-d) trained on
cached token features (FeatureTable.gather re-pads each batch) of T = 16, 64 and 256 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def config(s_device: torch.device, records: int, cache_dir: str) -> Any:
    from mmfuse.config import parse_config

    return parse_config(
        model_config(True, device=s_device, data={"limit": records}, train={"max_epochs": 2, "cache_dir": cache_dir})
    )


def prepared_run(cfg: Any, n: int) -> Any:
    """The run with its first `n` training records, each question made distinct (`text` + its record number)."""
    import dataclasses

    from mmfuse.train.run import Run

    torch.manual_seed(0)  # the same random resnet18 weights, hence the same cache key, in every process
    run = Run(cfg)
    train = run.splits["train"]
    if n > len(train):
        raise RuntimeError(f"scaling: {n} records asked, the split has {len(train)}")
    run.splits = {
        "train": [
            dataclasses.replace(r, inputs={**r.inputs, "text": f"{r.inputs['text']} {i}"})
            for i, r in enumerate(train[:n])
        ]
    }
    return run


def memory(cache_dir: str) -> dict[str, float]:
    """Resident memory now (MB): VmRSS and its parts, and the resident pages of files mapped from `cache_dir`."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
        cache = 0.0
        in_cache = False
        root = str(Path(cache_dir).resolve())
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not line.startswith(("Rss", "Pss", "Size")):
                in_cache = len(head) >= 6 and head[5].startswith(root)
            elif in_cache and line.startswith("Rss:"):
                cache += int(head[1]) / 1024
        out["cache_mapped_rss"] = cache
    except OSError:
        pass
    return out


def child(argv: list[str]) -> None:
    """One data size in this process: prints a JSON line with epoch times and memory."""
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int)
    p.add_argument("--total", type=int)
    p.add_argument("--cache-dir")
    p.add_argument("--workdir")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    device = setup(a.device)
    from mmfuse.train.data import make_loader

    stages = {"imports": memory(a.cache_dir)}
    run = prepared_run(config(device, a.total, a.cache_dir), a.records)
    model_mb = sum(t.numel() * t.element_size() for t in [*run.model.parameters(), *run.model.buffers()]) / 2**20
    stages["records + model"] = memory(a.cache_dir)
    feats = run.prepare()
    stages["cache opened"] = memory(a.cache_dir)
    loader = make_loader(run.model, run.splits["train"], "train", feats, run.loader_options)
    module = run.module()
    stages["loader built"] = memory(a.cache_dir)
    _, EpochClock = lightning_callbacks()
    clock = EpochClock(device)
    trainer = mmfuse_trainer(run.cfg, Path(a.workdir), [clock])
    trainer.fit(module, loader)
    end = now(device)
    stages["after fit"] = memory(a.cache_dir)
    recs = run.splits["train"]
    out = {
        "records": len(recs),
        "distinct_images": len({str(r.inputs["image"]) for r in recs}),
        "distinct_texts": len({r.inputs["text"] for r in recs}),
        "epoch_s": end - clock.starts[1],  # the second epoch, checkpoint and fit's teardown included
        "epoch_train_s": clock.train_only[1],  # the second epoch's batches alone (start to end of epoch hooks)
        "first_epoch_s": clock.starts[1] - clock.starts[0],
        "train_part_s": clock.train_only,
        "rss_before_fit_mb": stages["loader built"].get("VmRSS", float("nan")),
        "peak_rss_mb": max_rss_mb(),
        "model_mb": model_mb,
        "memory_mb": stages,
    }
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def data_sizes(s: Settings) -> list[list[dict[str, Any]]]:
    """Per round, the children's results in FACTORS order (the order they ran in rotates)."""
    from mmfuse.train.run import Run  # noqa: F401  (fails here, not in a child, if mmfuse is broken)

    base = 256 if s.quick else 1024
    total = base * FACTORS[-1]
    cache_dir = str(s.workdir / "fc")
    run = prepared_run(config(s.device, total, cache_dir), total)
    run.prepare()  # fill the cache once for the largest size; the children only read it
    del run
    rounds = s.rounds(2, 1)
    out: list[list[dict[str, Any]]] = []
    for r in range(rounds):
        k = r % len(FACTORS)
        got = {}
        for f in FACTORS[k:] + FACTORS[:k]:
            cmd = [
                sys.executable,
                str(HERE / "bench_scaling.py"),
                "--child",
                f"--records={base * f}",
                f"--total={total}",
                f"--cache-dir={cache_dir}",
                f"--workdir={s.workdir / f'x{f}r{r}'}",
                f"--device={s.device.type}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                raise RuntimeError(f"scaling child x{f} failed: {proc.stderr[-2000:]}")
            got[f] = {"factor": f, "round": r, **json.loads(line[len("RESULT ") :])}
            print(
                f"  round {r + 1}/{rounds} x{f}: {1e6 * got[f]['epoch_train_s'] / (base * f):.0f} us/sample", flush=True
            )
        out.append([got[f] for f in FACTORS])
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
    rounds = data_sizes(s)
    res = Result("scaling")

    def per(d: dict[str, Any]) -> float:
        return 1e6 * d["epoch_train_s"] / d["records"]

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    for i, f in enumerate(FACTORS):
        ds = [rd[i] for rd in rounds]
        rel = [per(rd[i]) / per(rd[0]) for rd in rounds]  # vs the 1x of the same round
        mem = ds[0]["memory_mb"]
        res.rows.append(
            Row(
                f"cached epoch, {f}x data ({ds[0]['records']} records, {ds[0]['distinct_images']} distinct images, "
                f"{ds[0]['distinct_texts']} distinct texts)",
                med([per(d) for d in ds]),
                "us/sample",
                f"{fmt(med(rel))}x the 1x cost (per round {fmt(min(rel))}-{fmt(max(rel))})",
                f"batches {med([d['epoch_train_s'] for d in ds]):.2f} s (whole epoch with checkpoint "
                f"{med([d['epoch_s'] for d in ds]):.2f} s); peak RSS {med([d['peak_rss_mb'] for d in ds]):.0f} MB: "
                f"{mem['imports'].get('VmRSS', 0):.0f} after imports, "
                f"+{mem['records + model'].get('VmRSS', 0) - mem['imports'].get('VmRSS', 0):.0f} records + model "
                f"({ds[0]['model_mb']:.0f} MB of tensors), "
                f"+{mem['loader built'].get('VmRSS', 0) - mem['records + model'].get('VmRSS', 0):.0f} cache + loader, "
                f"{mem['after fit'].get('VmRSS', 0):.0f} after fit (anon {mem['after fit'].get('RssAnon', 0):.0f}, "
                f"file {mem['after fit'].get('RssFile', 0):.0f}, of which cache pages "
                f"{mem['after fit'].get('cache_mapped_rss', 0):.1f})",
            )
        )
    per_ratios = [per(rd[-1]) / per(rd[0]) for rd in rounds]
    rss_ratios = [rd[-1]["peak_rss_mb"] / rd[0]["peak_rss_mb"] for rd in rounds]
    per_ratio, rss_ratio = med(per_ratios), med(rss_ratios)
    big, base = rounds[0][-1], rounds[0][0]
    per_record_kb = 1024 * (big["peak_rss_mb"] - base["peak_rss_mb"]) / max(big["records"] - base["records"], 1)
    res.targets += [
        Target.at_most(
            "scaling: per-sample epoch cost at 16x <= 1.2x the 1x cost (linear)", per_ratio, 1.2, per_ratios
        ),
        Target.at_most(
            "scaling: peak RSS at 16x <= 1.1x the 1x peak",
            rss_ratio,
            1.1,
            rss_ratios,
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
        "sizes": rounds,
        "data_sizes_s": data_s,
        "cross_attention_step_s": {str(t): m[t].times for t in LENGTHS},
        "per_record_kb": per_record_kb,
    }
    return res


if __name__ == "__main__" and "--child" in sys.argv:
    child([a for a in sys.argv[1:] if a != "--child"])
