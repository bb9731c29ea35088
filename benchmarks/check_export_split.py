"""Does an exported file give the same answers as `mmfuse predict` on a whole split?

Exports RUN (`mmfuse.export.export_run`), then runs the file (onnxruntime or TorchScript) and the PyTorch model
(`mmfuse predict`'s path: `mmfuse.predict.Predictor`) on every record of the split with every input present, in
batches, and reports per task: records, records whose discrete answer differs, and the max |logit difference|
(absolute, and per unit of max(1, max |logit|)).

Usage: python benchmarks/check_export_split.py RUN --out DIR [--format onnx] [--split test] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mmfuse.builders import build_schema, load_splits
from mmfuse.export import export_run
from mmfuse.export.backends import Runner
from mmfuse.export.build import collated
from mmfuse.export.spec import flat_inputs, input_specs
from mmfuse.predict import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    t0 = time.perf_counter()
    path = export_run(args.run, args.out, format=args.format)
    exported_s = time.perf_counter() - t0
    predictor = Predictor(args.run, device="cpu")
    model = predictor.model.eval()
    records = load_splits(predictor.config, build_schema(predictor.config, model.encoders))[args.split]
    records = [r for r in records if all(r.inputs.get(m) is not None for m in model.encoders)]
    runner = Runner(path, args.format)
    max_logit: dict[str, float] = {}
    stats = {
        t: {"records": 0, "different_answers": 0, "max_abs_diff": 0.0, "max_scaled_diff": 0.0} for t in model.tasks
    }
    for start in range(0, len(records), args.batch):
        chunk = records[start : start + args.batch]
        inputs = collated(model, chunk)
        specs = input_specs(model, inputs, chunk[0].inputs)
        with torch.inference_mode():
            want = model(inputs).logits
        got = runner([s.name for s in specs], flat_inputs(specs, inputs))
        for (name, task), array in zip(model.tasks.items(), got, strict=True):
            mine, theirs = want[name], torch.from_numpy(array).to(want[name].dtype)
            diff = float((mine - theirs).abs().max())
            s = stats[name]
            s["records"] += len(chunk)
            s["different_answers"] += int(
                (task.predict(mine)["prediction"] != task.predict(theirs)["prediction"]).sum()
            )
            s["max_abs_diff"] = max(s["max_abs_diff"], diff)
            s["max_scaled_diff"] = max(s["max_scaled_diff"], diff / max(1.0, float(mine.abs().max())))
            max_logit[name] = max(max_logit.get(name, 0.0), float(mine.abs().max()))
    result = {"file": str(path), "split": args.split, "export_s": round(exported_s, 1), "tasks": stats}
    result["max_abs_logit"] = max_logit
    text = json.dumps(result, indent=1)
    (args.out / f"check_{args.split}.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
