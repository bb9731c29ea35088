#!/usr/bin/env bash
# GPU check, in one go on a machine with a CUDA GPU:
#   1. the built-in easy-VQA training on the GPU in bf16-mixed (the feature cache is built here),
#   2. the same in 16-mixed (GradScaler + fused AdamW + gradient clipping),
#   3. the test suite's GPU-marked tests (`pytest -m gpu`),
# then a summary (date, GPU, wall time per phase, accuracy) to paste into docs/gpu.md.
#
# Usage: bash scripts/gpu_check.sh [EPOCHS]      (default 3; the built-in config trains 15)
# Env:   GPU_CHECK_OUT=dir (default runs/gpu-check-<date>), GPU_CHECK_LIMIT=N (records per split, for a quick look),
#        GPU_CHECK_PYTHON=python (default .venv/bin/python, made by scripts/setup.sh when missing),
#        GPU_CHECK_ACCELERATOR=cpu (a dry run of the script's mechanics on a CPU machine; its checks then fail).
# Exit:  0 when every phase passed; 1 otherwise (every phase still runs); 2 when no GPU is visible.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || bash scripts/setup.sh || exit 1
ACCELERATOR=${GPU_CHECK_ACCELERATOR:-gpu}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
EPOCHS=${1:-3}
OUT=${GPU_CHECK_OUT:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LIMIT=()
[ -n "${GPU_CHECK_LIMIT:-}" ] && LIMIT=(--set "data.limit=${GPU_CHECK_LIMIT}")

ACCELERATOR=$ACCELERATOR "$PY" - <<'EOF' | tee "$OUT/gpu.txt"; [ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
import os, sys, torch
if os.environ["ACCELERATOR"] == "cpu":
    print("gpu: none (dry run on the CPU)"); sys.exit(0)
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU visible to torch: nothing to check")
p = torch.cuda.get_device_properties(0)
print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF

FAILED=0
declare -A WALL RC
phase() {  # phase NAME COMMAND...: runs it, logs to $OUT/NAME.log, records wall time and exit code
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" > >(tee "$OUT/$name.log") 2>&1
    RC[$name]=$?
    WALL[$name]=$((SECONDS - t0))
    [ "${RC[$name]}" -eq 0 ] || FAILED=1
    echo "== $name: exit ${RC[$name]}, ${WALL[$name]} s"
}

for precision in bf16-mixed 16-mixed; do
    phase "train-$precision" "$PY" -m mmfuse.cli train --out "$OUT/$precision" \
        --set "train.accelerator=$ACCELERATOR" --set train.devices=1 --set "train.precision=$precision" \
        --set "train.max_epochs=$EPOCHS" --set train.progress_bar=false "${LIMIT[@]}"
done
phase "pytest-gpu" "$PY" -m pytest -q -m gpu -rs tests

"$PY" - "$OUT" "$EPOCHS" "${WALL[train-bf16-mixed]}" "${WALL[train-16-mixed]}" "${WALL[pytest-gpu]}" \
    "${RC[train-bf16-mixed]}" "${RC[train-16-mixed]}" "${RC[pytest-gpu]}" <<'EOF' | tee "$OUT/summary.md"
import json, sys, time
from pathlib import Path
out, epochs, walls, rcs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:6], sys.argv[6:9]
print(f"## GPU check {time.strftime('%Y-%m-%d')}\n\n{(out / 'gpu.txt').read_text().strip()}\n")
print(f"built-in easy-VQA config, {epochs} epochs, one GPU\n")
print("| phase | exit | wall (s) | device | precision | features (s) | fit (s) | test answer accuracy |")
print("|---|---|---|---|---|---|---|---|")
for name, wall, rc in zip(["train-bf16-mixed", "train-16-mixed", "pytest-gpu"], walls, rcs):
    row = [name, rc, f"{float(wall):.0f}"]
    metrics = out / name.removeprefix("train-") / "metrics.json"
    if name.startswith("train") and metrics.exists():
        s = json.loads(metrics.read_text())
        split = "test" if "test" in s["metrics"] else "val"
        acc = s["metrics"][split].get("answer", {}).get("accuracy")
        t = s["timings_s"]
        row += [s["device"], s.get("precision", "?"), str(t.get("features", "")), str(t.get("fit", "")),
                f"{acc:.4f} ({split})" if acc is not None else "?"]
    else:
        row += [""] * 5
    print("| " + " | ".join(row) + " |")
EOF
for precision in bf16-mixed 16-mixed; do  # the run must really have used the GPU in that precision
    "$PY" -c "import json,sys; s=json.load(open('$OUT/$precision/metrics.json')); \
sys.exit(0 if s['device'].startswith('cuda') and s['precision']=='$precision' else 1)" 2>/dev/null || {
        echo "gpu_check: $precision did not run on the GPU in $precision"; FAILED=1; }
done
echo "logs and runs: $OUT"
exit $FAILED
