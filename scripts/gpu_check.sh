#!/usr/bin/env bash
# GPU check, in one go on a machine with a CUDA GPU:
#   1. the built-in easy-VQA training on the GPU in bf16-mixed (the feature cache is built here),
#   2. the same in 16-mixed (GradScaler + fused AdamW + gradient clipping),
#   3. the test suite's GPU-marked tests (`pytest -m gpu`),
#   4. with 2+ GPUs (`nvidia-smi -L`): 2-GPU DDP on a small cut of the built-in config (`ddp-2gpu`), then the same as
#      two nodes on this machine, one GPU each, started by torchrun on the loopback address (`two-nodes`): its test
#      metrics must equal the 2-GPU run's (the same 2 processes, the same batches),
# then a summary (date, GPU, wall time per phase, accuracy) to paste into docs/gpu.md.
#
# Usage: bash scripts/gpu_check.sh [EPOCHS]      (default 3; the built-in config trains 15)
# Env:   GPU_CHECK_OUT=dir (default ${TMPDIR:-/tmp}/mmfuse-gpu-check-<date>-<time>: outside the repository),
#        GPU_CHECK_LIMIT=N (records per split, for a quick look; the multi-GPU phases use GPU_CHECK_MULTI_LIMIT,
#        default 2000), GPU_CHECK_PYTHON=python (a path or a command found on PATH; default .venv/bin/python, made by
#        scripts/setup.sh when missing), GPU_CHECK_MULTI=auto|1|0 (the multi-GPU phases: auto = when nvidia-smi lists
#        2+ GPUs; 1 = always), GPU_CHECK_TIMEOUT=seconds (per multi-GPU command, default 1800: a hung rank fails the
#        phase instead of the script), GPU_CHECK_ACCELERATOR=cpu (a dry run of the script's mechanics on a CPU machine,
#        the multi-GPU phases over gloo with GPU_CHECK_MULTI=1; its GPU checks then fail).
# Exit:  0 when every phase passed; 1 otherwise (every phase still runs); 2 when no GPU is visible or a setting is bad.
set -uo pipefail
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
case ${GPU_CHECK_MULTI:-auto} in
    auto) MULTI=$([ "$GPUS" -ge 2 ] && echo 1 || echo 0) ;;
    0|1) MULTI=$GPU_CHECK_MULTI ;;
    *) echo "gpu_check: GPU_CHECK_MULTI=$GPU_CHECK_MULTI: expected auto, 1 or 0"; exit 2 ;;
esac
# Paths given by the caller are read from the caller's folder, before the cd below.
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    PY=$(command -v -- "$GPU_CHECK_PYTHON") || { echo "gpu_check: GPU_CHECK_PYTHON=$GPU_CHECK_PYTHON: no such command"; exit 2; }
    case $PY in /*) ;; *) PY=$PWD/$PY ;; esac
fi
OUT=${GPU_CHECK_OUT:-${TMPDIR:-/tmp}/mmfuse-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_check: GPU_CHECK_OUT=$OUT: cannot create it"; exit 2; }
cd "$(dirname "$0")/.."
if [ -z "${GPU_CHECK_PYTHON:-}" ]; then
    PY=$PWD/.venv/bin/python
    [ -x "$PY" ] || bash scripts/setup.sh || exit 1
fi
ACCELERATOR=${GPU_CHECK_ACCELERATOR:-gpu}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
EPOCHS=${1:-3}
LIMIT=()
[ -n "${GPU_CHECK_LIMIT:-}" ] && LIMIT=(--set "data.limit=${GPU_CHECK_LIMIT}")
TIMEOUT=${GPU_CHECK_TIMEOUT:-1800}

ACCELERATOR=$ACCELERATOR "$PY" - <<'EOF' | tee "$OUT/gpu.txt"; [ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
import os, sys, torch
if os.environ["ACCELERATOR"] == "cpu":
    print("gpu: none (dry run on the CPU)"); sys.exit(0)
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU visible to torch: nothing to check")
p = torch.cuda.get_device_properties(0)
print(f"gpu: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF

FAILED=0
PHASES=()
declare -A WALL RC
phase() {  # phase NAME COMMAND...: runs it, logs to $OUT/NAME.log, records wall time and exit code
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" > >(tee "$OUT/$name.log") 2>&1
    RC[$name]=$?
    WALL[$name]=$((SECONDS - t0))
    PHASES+=("$name")
    [ "${RC[$name]}" -eq 0 ] || FAILED=1
    echo "== $name: exit ${RC[$name]}, ${WALL[$name]} s"
}
check() {  # check MESSAGE PYTHON-EXPRESSION: the expression (over s, the run's metrics.json) must hold
    "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); sys.exit(0 if ($2) else 1)" "$3" 2>/dev/null || {
        echo "gpu_check: $1"; FAILED=1; }
}

for precision in bf16-mixed 16-mixed; do
    phase "train-$precision" "$PY" -m mmfuse.cli train --out "$OUT/train-$precision" \
        --set "train.accelerator=$ACCELERATOR" --set train.devices=1 --set "train.precision=$precision" \
        --set "train.max_epochs=$EPOCHS" --set train.progress_bar=false "${LIMIT[@]}"
done
phase "pytest-gpu" "$PY" -m pytest -q -m gpu -rs tests

# ---- several GPUs: 2 processes on one node, then 2 nodes of one process each (same batches: same metrics)
SMALL=(--set "data.limit=${GPU_CHECK_MULTI_LIMIT:-2000}" --set train.max_epochs=2 --set train.progress_bar=false
       --set "train.accelerator=$ACCELERATOR" --set train.strategy=ddp --set train.precision=bf16-mixed)
two_nodes() {  # two torchrun "nodes" on this machine, one GPU each (CUDA_VISIBLE_DEVICES), gloo/NCCL over loopback
    local port pids=() rc=0
    port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    for node in 0 1; do
        CUDA_VISIBLE_DEVICES=$node NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo} timeout "$TIMEOUT" \
            "$PY" -m torch.distributed.run --nnodes 2 --node_rank "$node" --nproc_per_node 1 \
            --master_addr 127.0.0.1 --master_port "$port" \
            -m mmfuse.cli train --out "$OUT/two-nodes" "${SMALL[@]}" --set train.devices=1 --set train.num_nodes=2 \
            > >(sed "s/^/[node $node] /") 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    return $rc
}
if [ "$MULTI" = 1 ]; then
    phase "ddp-2gpu" timeout "$TIMEOUT" "$PY" -m mmfuse.cli train --out "$OUT/ddp-2gpu" "${SMALL[@]}" --set train.devices=2
    phase "two-nodes" two_nodes
else
    echo "== multi-GPU phases skipped: nvidia-smi lists $GPUS GPU(s) (GPU_CHECK_MULTI=1 runs them anyway)"
fi

ROWS=()
for name in "${PHASES[@]}"; do ROWS+=("$name:${WALL[$name]}:${RC[$name]}"); done
"$PY" - "$OUT" "$EPOCHS" "${ROWS[@]}" <<'EOF' | tee "$OUT/summary.md"
import json, sys, time
from pathlib import Path
out, epochs, rows = Path(sys.argv[1]), sys.argv[2], [a.split(":") for a in sys.argv[3:]]
print(f"## GPU check {time.strftime('%Y-%m-%d')}\n\n{(out / 'gpu.txt').read_text().strip()}\n")
print(f"built-in easy-VQA config: {epochs} epochs on one GPU; ddp-2gpu and two-nodes: 2 epochs of a cut, 2 processes\n")
print("| phase | exit | wall (s) | device | processes | precision | features (s) | fit (s) | test answer accuracy |")
print("|---|---|---|---|---|---|---|---|---|")
for name, wall, rc in rows:
    row = [name, rc, f"{float(wall):.0f}"]
    metrics = out / name / "metrics.json"
    if metrics.exists():
        s = json.loads(metrics.read_text())
        split = "test" if "test" in s["metrics"] else "val"
        acc = s["metrics"][split].get("answer", {}).get("accuracy")
        t = s["timings_s"]
        row += [s["device"], str(s.get("world_size", 1)), s.get("precision", "?"), str(t.get("features", "")),
                str(t.get("fit", "")), f"{acc:.4f} ({split})" if acc is not None else "?"]
    else:
        row += [""] * 6
    print("| " + " | ".join(row) + " |")
EOF
for precision in bf16-mixed 16-mixed; do  # the run must really have used the GPU in that precision
    check "$precision did not run on the GPU in $precision" \
        "s['device'].startswith('cuda') and s['precision'] == '$precision'" "$OUT/train-$precision/metrics.json"
done
if [ "$MULTI" = 1 ]; then
    for name in ddp-2gpu two-nodes; do
        check "$name did not run as 2 processes on GPUs" "s['device'].startswith('cuda') and s['world_size'] == 2" \
            "$OUT/$name/metrics.json"
    done
    # Same processes, same batches: the test metrics agree (up to the GPU's reduction order: 1e-3).
    "$PY" - "$OUT/ddp-2gpu/metrics.json" "$OUT/two-nodes/metrics.json" <<'EOF' || FAILED=1
import json, sys
try:
    a, b = ([json.load(open(p))["metrics"]["test"] for p in sys.argv[1:]])
except (OSError, KeyError, ValueError) as err:
    sys.exit(f"gpu_check: two-nodes vs ddp-2gpu: no metrics to compare ({err})")
diff = max(abs(a[t][m] - b[t][m]) for t in a for m in a[t])
print(f"two-nodes vs ddp-2gpu: largest test-metric difference {diff:.2e} (allowed 1e-3)")
sys.exit(0 if diff <= 1e-3 else "gpu_check: two-nodes does not give the metrics of ddp-2gpu")
EOF
fi
echo "logs and runs: $OUT"
exit $FAILED
