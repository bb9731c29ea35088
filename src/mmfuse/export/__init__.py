"""Export a finished run's whole model (encoders, fusion, heads) as ONNX or TorchScript, verified against PyTorch.

Shapes: B batch, T tokens, C_t outputs of task t.

The exported model maps preprocessed tensors (what each encoder's `collate` makes: `image` (B, 3, S, S),
`text.input_ids` (B, T), ...) to one logits tensor (B, C_t) per task, with the batch and sequence axes dynamic.
`export.json` beside it names the inputs and outputs, the preprocessing each input needs, each task's kind and
classes, the mmfuse version and the run's config hash, and the result of the check: the written file is run on a
batch of the run's own records (of another size than the traced one) and compared with the PyTorch forward.

Example:
    >>> path = export_run("runs/easy_vqa", "exported/easy_vqa", format="onnx")
    >>> json.loads((path.parent / "export.json").read_text())["check"]["max_abs_diff"]
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from mmfuse.config import ConfigError

FORMATS = ("onnx", "torchscript")
DEFAULT_DIR = "export"  # `mmfuse export RUN` writes into RUN/export, where `mmfuse predict RUN` looks for it
TOLERANCE = 1e-4  # max |logit difference| the check accepts, per unit of max(1, max |logit|) of each task
NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "torchscript": ()}


class ExportError(ConfigError):
    """A run that cannot be exported, or an export that fails its check, as one line."""


def check_request(run_dir: str | Path, out_dir: str | Path | None, format: str) -> tuple[Path, Path]:
    """Refuse an unknown format, a missing package, a path that is not a finished run and an `out_dir` that is a
    file, before anything heavy is imported. Returns (run_dir, out_dir) as paths (`out_dir` None: RUN/export)."""
    from mmfuse.config import check_run_dir

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    missing = [name for name in NEEDS[format] if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"exporting to {format} needs {', '.join(missing)} (not installed): pip install 'mmfuse[export]'"
        )
    run = check_run_dir(run_dir)
    out = Path(out_dir) if out_dir is not None else run / DEFAULT_DIR
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: --out must be a directory, and this is a file")
    return run, out


def export_run(
    run_dir: str | Path, out_dir: str | Path | None = None, format: str = "onnx", check_size: int = 16
) -> Path:
    """Export the model of the run in `run_dir` into `out_dir` (created), with `export.json` beside it.

    Args:
        run_dir: a finished run directory (config.yaml + model.safetensors), as `mmfuse train` writes it.
        out_dir: where `model.onnx` or `model.pt`, `export.json` and each text input's `<modality>.tokenizer.json`
            go; default RUN/export (where `mmfuse predict RUN` finds it).
        format: "onnx" or "torchscript".
        check_size: the records the exported file is checked on (at most; another size than the traced 2).

    Returns:
        The exported model file.

    Raises:
        ExportError: one line: a bad request, a part of the model that cannot be traced (named, with the reason),
            or a check that fails (max |logit difference| over `TOLERANCE`, or another decision: the file is
            removed).
    """
    from mmfuse.export.build import ExportJob
    from mmfuse.export.describe import write_tokenizers

    run, out = check_request(run_dir, out_dir, format)
    job = ExportJob(run, format, check_size)
    existed = out.exists()
    path = job.write(out)  # creates `out` once the graph is captured
    check = job.check(path)
    if not check["passed"]:
        path.unlink()
        if not existed:
            out.rmdir()
        raise ExportError(f"{run}: the exported model disagrees with PyTorch, not kept: {check['summary']}")
    _write_json(out / "export.json", job.describe(path, check, write_tokenizers(job.model, out)))
    return path


def read_export_info(path: str | Path) -> dict[str, Any]:
    """The `export.json` next to an exported model file."""
    return json.loads((Path(path).parent / "export.json").read_text())


def _write_json(path: Path, info: dict[str, Any]) -> None:
    from mmfuse.io import atomic_write_text

    atomic_write_text(path, json.dumps(info, indent=2) + "\n")
