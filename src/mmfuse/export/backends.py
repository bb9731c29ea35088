"""Writing a flat model as ONNX or TorchScript, and running the written file.

Shapes: B batch.

Every export first captures the graph with `torch.export` (non-strict), whatever the format: it refuses Python
control flow that depends on tensor values, which a tracer would silently freeze into the branch the example batch
took. ONNX is then written by the dynamo exporter from that graph (the TorchScript-based exporter only if the
dynamo one fails, as `exporter` says); TorchScript by `torch.jit.trace`.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmfuse.export.spec import BATCH, InputSpec
from mmfuse.text import one_line

log = logging.getLogger(__name__)

OPSET = 18
FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}


def dynamic_shapes(specs: Sequence[InputSpec]) -> tuple[dict[int, object], ...]:
    """`torch.export` dynamic shapes of the flat inputs: every named axis of their specs."""
    return tuple({i: torch.export.Dim.DYNAMIC for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs)


def capture(module: torch.nn.Module, args: tuple[torch.Tensor, ...], specs: Sequence[InputSpec]):
    """`torch.export.export` of `module` with the specs' dynamic axes (raises what torch.export raises).

    `module.forward(*tensors)` takes its inputs as one variadic argument: its dynamic shapes are one tuple. What
    torch prints on a failure (warnings, the partial graph on stderr) is kept out: the caller reports it in one line.
    """
    with quiet():
        return torch.export.export(module, args, dynamic_shapes=(dynamic_shapes(specs),), strict=False)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep torch's log lines up to warnings, and what it prints to stderr, out of the terminal."""
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(level)


def write_onnx(
    program: Any, module: torch.nn.Module, args: tuple[torch.Tensor, ...], specs: Sequence[InputSpec], path: Path
) -> str:
    """Write `program` (`capture` of `module`) to `path` as ONNX; returns the exporter used."""
    names = [s.name for s in specs]
    outputs = list(module.tasks)
    try:
        torch.onnx.export(
            program, args, str(path), dynamo=True, input_names=names, output_names=outputs,
            opset_version=OPSET, external_data=False, verbose=False, optimize=True,
        )  # fmt: skip
        exporter = "dynamo"
    except Exception as err:  # noqa: BLE001  (any failure of the dynamo exporter: fall back, say why)
        reason = one_line(err, 200)
        log.warning("the dynamo ONNX exporter failed (%s); using the TorchScript-based exporter", reason)
        axes = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs}
        axes |= {name: {0: BATCH} for name in outputs}
        torch.onnx.export(
            module, args, str(path), dynamo=False, input_names=names, output_names=outputs,
            dynamic_axes=axes, opset_version=OPSET,
        )  # fmt: skip
        return f"torchscript-based (the dynamo exporter failed: {reason})"
    name_axes(path, specs)
    return exporter


def name_axes(path: Path, specs: Sequence[InputSpec]) -> None:
    """Rename the dynamo exporter's symbolic dimensions (`s18`) to the specs' axis names (`batch`), in place."""
    import onnx

    proto = onnx.load(str(path))
    names: dict[str, str] = {}
    by_name = {s.name: s for s in specs}
    for value in proto.graph.input:
        spec = by_name.get(value.name)
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if spec is not None and dim.dim_param and isinstance(spec.shape[i], str):
                names.setdefault(dim.dim_param, str(spec.shape[i]))
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    onnx.save(proto, str(path))


def write_torchscript(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> str:
    """Write `module` traced on `args` to `path` (`torch.jit.save`); returns the exporter used."""
    traced = torch.jit.trace(module, args, check_trace=False, strict=False)
    traced.save(str(path))
    return "torch.jit.trace"


class Runner:
    """Runs an exported file on flat numpy/tensor inputs: onnxruntime for ONNX, `torch.jit.load` for TorchScript.

    Args:
        path: the exported file.
        fmt: "onnx" or "torchscript".
        threads: intra-op threads (None: the runtime's default).
    """

    def __init__(self, path: Path, fmt: str, threads: int | None = None) -> None:
        self.fmt = fmt
        if fmt == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in self.session.get_inputs()]
            self.version = f"onnxruntime {ort.__version__}"
        else:
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
            self.version = f"torch.jit {torch.__version__}"

    def __call__(self, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Flat inputs (named `names`, in the exported order) -> one (B, C_t) array per task, in output order.

        ONNX is fed by name (an input the graph does not use is left out); TorchScript takes every input in order.
        """
        if self.fmt == "onnx":
            feed = {n: t.numpy() for n, t in zip(names, tensors, strict=True) if n in self.input_names}
            return list(self.session.run(None, feed))
        with torch.inference_mode():
            return [t.numpy() for t in self.module(*tensors)]
