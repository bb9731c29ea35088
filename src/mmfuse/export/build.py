"""One export of one run: its model and records, the traced graph, the written file, its check and export.json.

Shapes: B batch, C_t outputs of task t.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfuse.export import TOLERANCE, ExportError
from mmfuse.export.backends import FILES, OPSET, Runner, capture, write_onnx, write_torchscript
from mmfuse.export.describe import outputs, preprocessing, reading
from mmfuse.export.spec import EncoderOnly, FlatModel, InputSpec, flat_inputs, input_specs
from mmfuse.text import flattened

TRACE_SIZE = 2  # records in the traced batch; the check batch has another size


class ExportJob:
    """The run's model, a traced batch and a check batch of its own records (every input present).

    Args:
        run_dir: a finished run directory.
        fmt: "onnx" or "torchscript".
        check_size: the most records the check runs on.
    """

    def __init__(self, run_dir: Path, fmt: str, check_size: int = 16) -> None:
        from mmfuse.runs import open_run

        loaded = open_run(run_dir)
        self.run_dir, self.fmt, self.model, self.config = run_dir, fmt, loaded.model.eval(), loaded.config
        records, self.split = run_records(loaded, TRACE_SIZE + check_size)
        self.trace_batch = collated(self.model, records[:TRACE_SIZE])
        rest = records[TRACE_SIZE:]
        self.check_batch = collated(self.model, rest if len(rest) not in (0, TRACE_SIZE) else records)  # another size
        self.specs = input_specs(self.model, self.trace_batch, records[0].inputs)
        self.flat = FlatModel(self.model, self.specs).eval()
        self.exporter = ""  # which exporter wrote the file (`write`)
        self.input_names = [s.name for s in self.specs]  # the inputs the written graph takes (`check`)

    def write(self, out: Path) -> Path:
        """Capture the graph (naming the part that cannot be traced), then create `out` and write the file into it;
        returns its path."""
        args = flat_inputs(self.specs, self.trace_batch)
        with torch.no_grad():
            try:
                program = capture(self.flat, args, self.specs)
            except Exception as err:  # noqa: BLE001  (torch.export raises many types; each becomes one line)
                raise ExportError(f"{self.run_dir}: cannot export: {self.untraceable(args, err)}") from None
            out.mkdir(parents=True, exist_ok=True)
            path = out / FILES[self.fmt]
            if self.fmt == "onnx":
                self.exporter = write_onnx(program, self.flat, args, self.specs, path)
            else:
                self.exporter = write_torchscript(self.flat, args, path)
        return path

    def untraceable(self, args: tuple[torch.Tensor, ...], err: BaseException) -> str:
        """The first encoder that cannot be captured alone, with the reason; else the fusion or heads."""
        for modality, encoder in self.model.encoders.items():
            picked = [(s, a) for s, a in zip(self.specs, args, strict=True) if s.modality == modality]
            specs, sub = [s for s, _ in picked], tuple(a for _, a in picked)
            try:
                capture(EncoderOnly(encoder, specs).eval(), sub, specs)
            except Exception as sub_err:  # noqa: BLE001
                return f"the {modality} encoder ({type(encoder).__name__}) cannot be traced: {reason(sub_err)}"
        return f"the fusion or a head ({type(self.model.fusion).__name__}) cannot be traced: {reason(err)}"

    def check(self, path: Path) -> dict[str, Any]:
        """Run the written file on the check batch and compare with the PyTorch forward, task by task."""
        runner = Runner(path, self.fmt)
        tensors = flat_inputs(self.specs, self.check_batch)
        with torch.inference_mode():
            want = self.model(self.check_batch).logits
            got = dict(zip(self.flat.tasks, runner([s.name for s in self.specs], tensors), strict=True))
            tasks = {name: compare(self.model.tasks[name], want[name], got[name]) for name in self.flat.tasks}
        worst = max(t["max_abs_diff"] for t in tasks.values())
        differ = [n for n, t in tasks.items() if not t["same_decisions"]]
        # float32 rounding grows with the logits' size: the tolerance is TOLERANCE per unit of max(1, max |logit|)
        over = [n for n, t in tasks.items() if not t["max_abs_diff"] <= TOLERANCE * t["scale"]]
        passed = not over and not differ
        scaled = max(t["max_abs_diff"] / t["scale"] for t in tasks.values())
        summary = f"max |logit difference| {worst:.3g}, {scaled:.3g} of max(1, |logit|) (tolerance {TOLERANCE:g})" + (
            f"; other decisions on {', '.join(differ)}" if differ else ""
        )
        self.input_names = getattr(runner, "input_names", self.input_names)  # ONNX drops inputs the graph ignores
        return {
            "runtime": runner.version,
            "split": self.split,
            "records": int(tensors[0].shape[0]),
            "traced_records": int(flat_inputs(self.specs, self.trace_batch)[0].shape[0]),
            "tolerance": TOLERANCE,
            "max_abs_diff": worst,
            "max_scaled_diff": scaled,
            "tasks": tasks,
            "passed": passed,
            "summary": summary,
        }

    def describe(self, path: Path, check: dict[str, Any], tokenizers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The contents of export.json (`tokenizers`: what `write_tokenizers` wrote beside the file)."""
        import mmfuse
        from mmfuse.io import sha256_file

        used = [s for s in self.specs if s.name in self.input_names]
        weights = self.run_dir / "model.safetensors"
        stat = weights.stat()
        return {
            "format": self.fmt,
            "file": path.name,
            "exporter": self.exporter,
            **({"opset": OPSET} if self.fmt == "onnx" else {}),
            "mmfuse_version": mmfuse.__version__,
            "torch_version": torch.__version__,
            "run": str(self.run_dir.resolve()),
            "config_sha256": sha256_file(self.run_dir / "config.yaml"),
            "weights": {
                "file": weights.name,
                "sha256": sha256_file(weights),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": f"{platform.machine()} {platform.system()}",
            "inputs": [s.as_json() for s in used],
            "preprocessing": {m: preprocessing(e) | tokenizers.get(m, {}) for m, e in self.model.encoders.items()},
            "reading": reading(self.config, self.model),
            "missing_inputs": "not supported: every input must be given (the graph has no absent masks)",
            "outputs": outputs(self.model),
            "check": check,
        }


def compare(task: Any, want: torch.Tensor, got: np.ndarray) -> dict[str, Any]:
    """Max |difference| of two (B, C) outputs, the logits' size max(1, max |want|), and whether the task's discrete
    predictions (class, labels) agree."""
    got_t = torch.from_numpy(np.asarray(got)).to(want.dtype)
    if got_t.shape != want.shape:
        return {"max_abs_diff": float("inf"), "same_decisions": False, "scale": 1.0}
    diff = float((got_t - want).abs().max()) if want.numel() else 0.0
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0  # the logits' size
    a, b = task.predict(want)["prediction"], task.predict(got_t)["prediction"]
    discrete = not a.is_floating_point()
    return {"max_abs_diff": diff, "same_decisions": bool(torch.equal(a, b)) if discrete else True, "scale": scale}


def reason(err: BaseException) -> str:
    """An export error's gist on one line: its first sentence, and the user code that raised it when torch names it
    (`File "x.py", line 5, in forward` then the line)."""
    text = flattened(err)
    first = (text.split(". ")[0] if ". " in text else text)[:200] or type(err).__name__
    lines = str(err).splitlines()
    calls = [i for i, line in enumerate(lines) if line.strip().startswith('File "')]
    if calls and calls[-1] + 1 < len(lines):
        where = lines[calls[-1]].strip().removeprefix("File ").replace('"', "")
        first += f" (at {where}: {lines[calls[-1] + 1].strip()[:80]})"
    return first


def run_records(loaded: Any, count: int) -> tuple[list[Any], str]:
    """Up to `count` of the run's own records with every input present and readable, from its test split (else
    val, else train: the first with more than `TRACE_SIZE` such records), and the split's name.

    Raises:
        ExportError: fewer than two such records.
    """
    from mmfuse.builders import build_schema, load_splits
    from mmfuse.data.dataset import validate_records

    model = loaded.model
    splits = load_splits(loaded.config, build_schema(loaded.config, model.encoders))
    found: list[tuple[list[Any], str]] = []
    for split in ("test", "val", "train"):
        complete = [r for r in splits.get(split, []) if all(r.inputs.get(m) is not None for m in model.encoders)]
        good, _ = validate_records(complete[: count * 2], {}, dict(model.encoders), True, allow_missing=True)
        found.append((good[:count], split))
        if len(good) > TRACE_SIZE:  # enough for a check batch of another size than the traced one
            return found[-1]
    if max(len(good) for good, _ in found) >= TRACE_SIZE:
        return max(found, key=lambda f: len(f[0]))
    raise ExportError(f"{loaded.run_dir}: its data has fewer than {TRACE_SIZE} readable records with every input")


def collated(model: Any, records: list[Any]) -> dict[str, Any]:
    """The collated inputs ({modality: tensor or {key: tensor}}) of `records`, as `mmfuse predict` makes them."""
    from mmfuse.data.collate import Collator
    from mmfuse.data.dataset import MultiModalDataset

    encoders = dict(model.encoders)
    dataset = MultiModalDataset(records, {}, encoders, train=False)
    return Collator(encoders, {})([dataset[i] for i in range(len(dataset))])["inputs"]


__all__ = ["ExportJob", "InputSpec"]
