"""Shared pieces of the benchmark suite: settings, timing, the reference model, data, notebook baselines, results.

Shapes: B batch, T text tokens, S image side, C classes.

Every comparison runs its sides in one process, on the same batches, interleaved in rounds (the order
rotates each round) so that a burst of load on this shared machine hits every side alike. Each round
runs `warmup` untimed steps, then `steps` timed ones; figures are medians over all timed steps.
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# torch threads: OMP_NUM_THREADS when it is set (on a machine shared with other jobs, 1 avoids oversubscription),
# else 2 (the development machine's cores).
THREADS = int(os.environ.get("OMP_NUM_THREADS") or 2)
BATCH = 32
IMAGE_SIZE = 64
FUSION_DIM = 256
NOTEBOOK_MAX_LENGTH = 128
TASK = "answer"


# ---------------------------------------------------------------- settings
@dataclass
class Settings:
    """What every comparison gets: the device and how long to measure."""

    device: torch.device
    quick: bool
    workdir: Path
    limit: int | None = None  # cap on the easy-VQA training records of `frozen` (None: all; --quick: 1024)
    rounds_override: int | None = None  # --rounds: every comparison's rounds

    def rounds(self, full: int, quick: int = 1) -> int:
        if self.rounds_override:
            return self.rounds_override
        return quick if self.quick else full

    def steps(self, full: int, quick: int = 2) -> int:
        return quick if self.quick else full

    @property
    def accelerator(self) -> str:
        return "gpu" if self.device.type == "cuda" else "cpu"


def quiet() -> None:
    """Silence Lightning's banners and the warnings that a benchmark run triggers on purpose."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "mmfuse", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def setup(device: str = "cpu", seed: int = 0) -> torch.device:
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    quiet()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return dev


# ---------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """Wall clock after every queued kernel has finished."""
    sync(device)
    return time.perf_counter()


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# A runner does `warmup` untimed steps then `steps` timed ones and returns the timed steps' seconds.
Runner = Callable[[int, int], list[float]]


def loop_runner(step: Callable[[int], None], device: torch.device) -> Runner:
    """Wrap `step(i)` (i: batch index, from 0 each round) as a runner."""

    def run(warmup: int, steps: int) -> list[float]:
        for i in range(warmup):
            step(i)
        times, t = [], now(device)
        for i in range(warmup, warmup + steps):
            step(i)
            t2 = now(device)
            times.append(t2 - t)
            t = t2
        return times

    return run


@dataclass
class Measurement:
    """Per-step seconds of one side, grouped by round, and the share of 2 cores it got."""

    rounds: list[list[float]]
    samples: int  # samples per step
    cpu_share: float = float("nan")  # process CPU seconds / (wall seconds * THREADS), over its rounds

    @property
    def times(self) -> list[float]:
        return [t for r in self.rounds for t in r]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def per_second(self) -> float:
        return self.samples / self.median

    def round_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.rounds]


def interleave(
    runners: dict[str, Runner], samples: int, rounds: int, warmup: int, steps: int
) -> dict[str, Measurement]:
    """Run every side `rounds` times, rotating the order each round."""
    names = list(runners)
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    cpu: dict[str, float] = dict.fromkeys(names, 0.0)
    wall: dict[str, float] = dict.fromkeys(names, 0.0)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            c0, w0 = cpu_seconds(), time.perf_counter()
            times[name].append(runners[name](warmup, steps))
            cpu[name] += cpu_seconds() - c0
            wall[name] += time.perf_counter() - w0
            print(
                f"  round {r + 1}/{rounds} {name}: {1000 * statistics.median(times[name][-1]):.1f} ms/step", flush=True
            )
    return {n: Measurement(times[n], samples, cpu[n] / max(wall[n] * THREADS, 1e-9)) for n in names}


def round_ratios(faster: Measurement, slower: Measurement) -> list[float]:
    """Per-round speed-up of `faster` over `slower` (>1: faster is faster); its spread shows the noise."""
    return [s / f for f, s in zip(faster.round_medians(), slower.round_medians())]


# ---------------------------------------------------------------- results
@dataclass
class Row:
    side: str
    value: float
    unit: str
    vs: str = ""  # e.g. "134x notebook"
    note: str = ""
    reference: float | None = None  # the figure measured earlier on this machine's CPU (REFERENCE), if any


# Figures measured earlier on the 2-core CPU machine (2 threads, batch 32, resnet18 at 64x64 + MiniLM, concat head):
# the suite should reproduce them, on an idle machine, before its ratios are believed.
REFERENCE = {
    "finetune notebook pad 128": 16.9,
    "finetune dynamic": 92.6,
    "torchmultimodal dynamic": 87.9,
    "frozen notebook pad 128": 56.0,
    "frozen notebook dynamic": 322.0,
    "matmul GFLOP/s": 219.0,
    "finetune GFLOP/s": 155.0,
}


def reference(key: str, device: torch.device) -> float | None:
    """The earlier CPU figure for `key`, or None on another device."""
    return REFERENCE[key] if device.type == "cpu" else None


@dataclass
class Target:
    what: str
    measured: float
    threshold: float
    met: bool | None  # None: not applicable (skipped)
    spread: tuple[float, float] | None = None  # min and max over rounds
    detail: str = ""
    higher_is_better: bool = True  # False for "at most" targets (costs, memory)

    @classmethod
    def at_least(cls, what: str, measured: float, threshold: float, per_round: list[float], **kw: Any) -> Target:
        """Met when `measured` >= `threshold`; the spread is the min and max of the per-round values."""
        return cls(what, measured, threshold, measured >= threshold, (min(per_round), max(per_round)), **kw)

    @classmethod
    def at_most(cls, what: str, measured: float, threshold: float, per_round: list[float], **kw: Any) -> Target:
        """Met when `measured` <= `threshold` (a cost); the spread is the min and max of the per-round values."""
        spread = (min(per_round), max(per_round))
        return cls(what, measured, threshold, measured <= threshold, spread, higher_is_better=False, **kw)

    def verdict(self) -> str:
        if self.met is None:
            return "skipped"
        if self.met:
            return "met"
        if self.spread is not None:
            best = self.spread[1] if self.higher_is_better else self.spread[0]
            if (best >= self.threshold) if self.higher_is_better else (best <= self.threshold):
                return "missed (within noise)"
        return "missed"


@dataclass
class Result:
    name: str
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    skipped: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for t, d in zip(self.targets, out["targets"]):
            d["verdict"] = t.verdict()
        return out


def fmt(x: float) -> str:
    if x != x:  # NaN
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def side_row(name: str, m: Measurement, note: str = "", vs: str = "", ref: float | None = None) -> Row:
    share = f"cpu {m.cpu_share:.0%}" if m.cpu_share == m.cpu_share else ""
    note = ", ".join(x for x in (f"{1000 * m.median:.1f} ms/step", share, note) if x)
    return Row(name, m.per_second, "samples/s", vs, note, ref)


# ---------------------------------------------------------------- the reference model and data
def classes() -> list[str]:
    from mmfuse.data.easy_vqa import EASY_VQA_TASKS

    return list(EASY_VQA_TASKS[TASK]["classes"])


def model_config(
    freeze: bool = False,
    fusion: dict[str, Any] | None = None,
    device: torch.device | None = None,
    data: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The reference run: resnet18 (random weights) at 64x64 + packaged MiniLM, concat, answer task, batch 32.

    Everything not named here is mmfuse's default (fused AdamW, grad clip 1.0, cosine schedule, deterministic).
    """
    return {
        "seed": 0,
        "model": {
            "encoders": {
                "image": {"name": "torchvision", "model": "resnet18", "image_size": IMAGE_SIZE, "freeze": freeze},
                "text": {"name": "hf_text", "model": "minilm", "pooling": "mean", "max_length": 128, "freeze": freeze},
            },
            "fusion": fusion or {"name": "concat", "output_dim": FUSION_DIM},
            "head": {"hidden_dims": []},
        },
        "tasks": {TASK: {"kind": "multiclass", "classes": classes()}},
        "data": {"source": "easy_vqa", "batch_size": BATCH, **(data or {})},
        "train": {
            "progress_bar": False,
            "accelerator": "gpu" if device is not None and device.type == "cuda" else "cpu",
            "max_epochs": 1000,
            **(train or {}),
        },
    }


def build_reference(freeze: bool = False, fusion: dict[str, Any] | None = None) -> Any:
    """The reference MultiTaskModel, built by mmfuse's own builder (seeded: the same weights every time)."""
    from mmfuse.builders import build_model

    torch.manual_seed(0)
    return build_model(model_config(freeze, fusion))


def easy_vqa_splits(val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[Any]]:
    """easy-VQA records read through the reference config's encoders (as `mmfuse train` reads them)."""
    from mmfuse.builders import build_encoders, build_schema
    from mmfuse.config import parse_config
    from mmfuse.data.easy_vqa import load_easy_vqa

    cfg = parse_config(model_config())
    return load_easy_vqa(build_schema(cfg, build_encoders(cfg.model)), val_fraction=val_fraction, seed=seed)


def train_records(n: int | None = None) -> list[Any]:
    records = easy_vqa_splits()["train"]
    return records if n is None else records[:n]


def collate_batches_of(model: Any, records: Sequence[Any], batch_size: int) -> list[dict[str, Any]]:
    """`records` in dynamically padded batches (the last may be short), by mmfuse's own dataset + collator."""
    from mmfuse.data.collate import Collator
    from mmfuse.data.dataset import MultiModalDataset

    ds = MultiModalDataset(records, model.tasks, dict(model.encoders), train=False)
    collate = Collator(dict(model.encoders), model.tasks)
    return [collate([ds[i] for i in range(a, min(a + batch_size, len(ds)))]) for a in range(0, len(ds), batch_size)]


def collate_batches(model: Any, records: Sequence[Any], n_batches: int) -> list[dict[str, Any]]:
    """The first `n_batches` full batches of `records`."""
    return collate_batches_of(model, records[: n_batches * BATCH], BATCH)[:n_batches]


def pad_to_max(batches: list[dict[str, Any]], records: Sequence[Any], tokenizer: Any) -> list[dict[str, Any]]:
    """The same batches with the text re-tokenised the notebook way: padding="max_length" (128)."""
    out = []
    for b, batch in enumerate(batches):
        texts = [r.inputs["text"] for r in records[b * BATCH : (b + 1) * BATCH]]
        text = tokenizer(
            texts, padding="max_length", truncation=True, max_length=NOTEBOOK_MAX_LENGTH, return_tensors="pt"
        )
        out.append({**batch, "inputs": {**batch["inputs"], "text": dict(text)}})
    return out


def tokens_per_batch(batches: list[dict[str, Any]]) -> float:
    return statistics.mean(b["inputs"]["text"]["input_ids"].shape[1] for b in batches)


def to_device(obj: Any, device: torch.device) -> Any:
    from mmfuse.utils import move_to

    return obj if device.type == "cpu" else move_to(obj, device)


def fresh_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


# ---------------------------------------------------------------- the notebook baseline
class NotebookModel(nn.Module):
    """The model as the common notebook writes it: torchvision resnet18 with `fc = Identity`, the Hugging Face
    model called on `tokenizer(..., padding="max_length")`, mean pooling, concat -> Linear -> Linear."""

    def __init__(self, image_net: nn.Module, text_model: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.cnn = image_net
        self.bert = text_model
        self.fc = nn.Linear(512 + text_model.config.hidden_size, FUSION_DIM)
        self.head = nn.Linear(FUSION_DIM, n_classes)

    def encode(self, pixels: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        img = self.cnn(pixels)  # (B, 512)
        hidden = self.bert(**text).last_hidden_state  # (B, T, H)
        mask = text["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        txt = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        return torch.cat([img, txt], dim=1)  # (B, 512 + H)

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(feats))  # (B, C)


def notebook_model(reference: Any) -> NotebookModel:
    """A notebook model with the reference model's encoder weights (plain NCHW torchvision, no mmfuse code)."""
    import torchvision
    from transformers import AutoModel

    from mmfuse.assets import minilm_dir

    cnn = torchvision.models.resnet18(weights=None)
    cnn.fc = nn.Identity()
    cnn.load_state_dict(reference.encoders["image"].net.state_dict())
    bert = AutoModel.from_pretrained(minilm_dir(), local_files_only=True)
    return NotebookModel(cnn, bert, len(classes()))


def notebook_step(model: NotebookModel, batches: list[dict[str, Any]], device: torch.device, frozen: bool) -> Callable:
    """One step of the notebook loop: encoders (under no_grad when frozen) -> concat -> Linear -> CE -> Adam."""
    params = list(model.fc.parameters()) + list(model.head.parameters()) if frozen else list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    if frozen:
        model.cnn.eval(), model.bert.eval()
        model.cnn.requires_grad_(False), model.bert.requires_grad_(False)
    else:
        model.train()

    def step(i: int) -> None:
        batch = to_device(batches[i % len(batches)], device)
        pixels, text, labels = batch["inputs"]["image"], batch["inputs"]["text"], batch["labels"][TASK]
        if frozen:
            with torch.no_grad():
                feats = model.encode(pixels, text)
        else:
            feats = model.encode(pixels, text)
        loss = F.cross_entropy(model.classify(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def minimal_step(
    model: Any, batches: list[dict[str, Any]], device: torch.device, clip: float | None = None, **adamw: Any
) -> Callable:
    """A minimal hand-written loop over an mmfuse MultiTaskModel: forward, CE, backward, [clip], AdamW(**adamw)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, **adamw)
    model.train()

    def step(i: int) -> None:
        batch = to_device(batches[i % len(batches)], device)
        logits = model(batch["inputs"]).logits[TASK]
        loss = F.cross_entropy(logits, batch["labels"][TASK])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    return step


# ---------------------------------------------------------------- driving mmfuse through Lightning
def lightning_callbacks() -> tuple[Any, Any]:
    import lightning as L

    class StepClock(L.Callback):
        """Marks the end of every training batch: step i costs mark[i+1] - mark[i] (data, hooks, step, logging)."""

        def __init__(self, device: torch.device) -> None:
            self.device, self.marks = device, []

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if not self.marks:
                self.marks.append(now(self.device))

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.marks.append(now(self.device))

        def intervals(self) -> list[float]:
            return [b - a for a, b in zip(self.marks, self.marks[1:])]

    class EpochClock(L.Callback):
        """Marks every training epoch's start: epoch e costs start[e+1] - start[e] (and the last, to fit's end)."""

        def __init__(self, device: torch.device) -> None:
            self.device, self.starts, self.train_only = device, [], []
            self.cpu_starts, self.train_cpu = [], []  # this process's CPU seconds, likewise

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.starts.append(now(self.device))
            self.cpu_starts.append(time.process_time())

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            self.train_only.append(now(self.device) - self.starts[-1])
            self.train_cpu.append(time.process_time() - self.cpu_starts[-1])

    return StepClock, EpochClock


def mmfuse_trainer(cfg: Any, run_dir: Path, callbacks: list[Any], max_steps: int = -1) -> Any:
    """mmfuse's own Trainer (`mmfuse.train.run.build_trainer`: its checkpointing, loggers, precision,
    determinism) plus our clocks, optionally stopped after `max_steps`."""
    from mmfuse.builders import train_options
    from mmfuse.train.run import build_trainer

    quiet()  # again: importing Lightning resets its loggers' levels
    trainer = build_trainer(train_options(cfg), run_dir, None, "min")
    trainer.callbacks[:0] = callbacks  # before ModelCheckpoint, which Lightning runs last anyway
    if max_steps > 0:
        trainer.fit_loop.epoch_loop.max_steps = max_steps
    return trainer


def lightning_runner(
    make_module: Callable[[], Any], cfg: Any, loader_of: Callable[[int], Any], workdir: Path, device: torch.device
) -> Runner:
    """Each round: a fresh mmfuse Trainer fits the (persistent) module for warmup + steps batches of
    `loader_of(n)`; the timed steps are the intervals between batch ends after the warm-up."""
    StepClock, _ = lightning_callbacks()
    module = make_module()
    count = [0]

    def run(warmup: int, steps: int) -> list[float]:
        count[0] += 1
        clock = StepClock(device)
        trainer = mmfuse_trainer(cfg, workdir / f"round{count[0]}", [clock], max_steps=warmup + steps)
        trainer.fit(module, loader_of(warmup + steps))
        times = clock.intervals()[warmup : warmup + steps]
        if len(times) != steps:
            raise RuntimeError(f"expected {steps} timed steps, the trainer ran {len(clock.intervals())}")
        return times

    return run


def list_loader(batches: list[dict[str, Any]]) -> Any:
    """A DataLoader that yields the given pre-collated batches in order."""
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=lambda b: b)


def mmfuse_module(model: Any, cfg: Any) -> Any:
    """MMFuseModule exactly as `train()` builds it (`Run.module`: weighting, balancer, lr, grad clip, schedule)."""
    from mmfuse.train.run import Run

    run = Run(cfg, model)
    return run.module()


def max_rss_mb() -> float:
    """This process's peak resident memory. `VmHWM` where Linux has it: `ru_maxrss` survives exec on Linux, so a
    child started by a big parent would report the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def apply_trainer_flags(cfg: Any, workdir: Path) -> None:
    """Build (and drop) one mmfuse Trainer first: the process-wide flags it sets (deterministic algorithms,
    cuDNN) then hold for every side of the comparison, not just for the rounds after mmfuse's first."""
    mmfuse_trainer(cfg, workdir / "flags", [])
