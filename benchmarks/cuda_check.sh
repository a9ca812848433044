#!/usr/bin/env bash
# The CUDA paths end to end, in one short run on a GPU machine (the project's own box has no GPU):
# the demo distillation (fp16 autocast + GradScaler, EMA, val every epoch) and in fp32, the student alone,
# val.py on CUDA (fp32 and --half) beside the CPU, ONNX export from CUDA, the
# distillation step vs student step + teacher forward at 640 px, the whole test suite (with
# pytest-xdist; else only the tests with CUDA branches), and the demo with 8 loader workers.
#
#   bash benchmarks/cuda_check.sh OUT_DIR            # writes OUT_DIR/summary.txt and cuda_check.tar.gz
#
# Each part has its own time limit and the whole a budget (BUDGET seconds, default 360): parts are
# taken in order of importance and skipped, with a line saying so, once the budget is spent; PARTS
# (space-separated part names) runs only those. DEVICE
# (default 0) and EXTRA (flags appended to every training command) exist for a dry run on the CPU:
#   DEVICE=cpu EXTRA="--epochs 1" BUDGET=600 bash benchmarks/cuda_check.sh /tmp/cuda_dry
# The lent GPU machine's image has torch, onnx, onnxruntime, pytest-xdist but not pycocotools: carry
# a cp312 wheel of it (the device tool's README says how) and put it on PYTHONPATH first, or the
# val.py --save-json figures and two test_val.py tests are missing. What the 2026-12-04 run found:
# benchmarks/results/cuda_h200.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/cuda_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
py=${PYTHON:-python3}
device=${DEVICE:-0}
budget=${BUDGET:-360}
read -r -a extra <<< "${EXTRA:-}"
export PYTHONUNBUFFERED=1
start=$EPOCHREALTIME

part() {  # part NAME LIMIT_S CMD... : run CMD with a limit, log to $work/NAME.log, one summary line
  local name=$1 limit=$2
  shift 2
  if [[ -n ${PARTS:-} && " $PARTS " != *" $name "* ]]; then
    return
  fi
  local used
  used=$(awk "BEGIN {print int($EPOCHREALTIME - $start)}")
  if ((used + 10 > budget)); then
    echo "$name: skipped (budget of ${budget}s spent: ${used}s)" | tee -a "$out/summary.txt"
    return
  fi
  ((limit > budget - used)) && limit=$((budget - used))
  local t0=$EPOCHREALTIME rc
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  rc=$?
  awk "BEGIN {printf \"%s: rc=%d in %.1f s (limit %d s)\n\", \"$name\", $rc, $EPOCHREALTIME - $t0, $limit}" \
    | tee -a "$out/summary.txt"
  tr '\r' '\n' < "$work/$name.log" | grep -v "^ *$" | tail -n 4 | cut -c1-240
}

runs=$work/runs
train=("$py" train_distill.py --demo --device "$device" --project "$runs" --exist-ok)
best=$runs/demo_cuda/weights/best.pt

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$py" -c "import torch, torchvision, cv2, sys; print(sys.version.split()[0], torch.__version__, \
torchvision.__version__, cv2.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  nproc
} 2>&1 | tee "$out/summary.txt"

part demo_distill 170 "${train[@]}" --name demo_cuda "${extra[@]}"
part val_cuda 45 "$py" val.py --weights "$best" --data data/demo.yaml --imgsz 160 --device "$device" \
  --save-json --project "$runs" --name val_cuda --exist-ok
part val_cuda_half 45 "$py" val.py --weights "$best" --data data/demo.yaml --imgsz 160 --device "$device" \
  --half --project "$runs" --name val_cuda_half --exist-ok
part val_cpu 60 "$py" val.py --weights "$best" --data data/demo.yaml --imgsz 160 --device cpu \
  --project "$runs" --name val_cpu --exist-ok
part train_step_640 120 "$py" -m benchmarks.bench_train_step --device "$device" --ratio \
  --student models/yolov5n.yaml --teacher models/yolov5s.yaml --imgsz 640 --batch-size 32 \
  --repeats 10 --steps 3 --no-mem --out "$work/train_step_ratio_640"
part export_onnx 60 "$py" export.py --weights "$best" --device "$device" --imgsz 160 \
  --output "$work/best.onnx"
if "$py" -c "import xdist" 2> /dev/null; then  # the whole suite fits the budget only in parallel
  part pytest_all 180 "$py" -m pytest -q -p no:cacheprovider -n "$(($(nproc) * 3 / 4))"
else
  part pytest_cuda_branches 120 "$py" -m pytest -q -p no:cacheprovider tests/test_amp.py \
    tests/test_torch_utils.py tests/test_export.py tests/test_int8.py
fi
part demo_workers8 90 "${train[@]}" --name demo_w8 --workers 8 --epochs 5 "${extra[@]}"
part demo_alone 120 "${train[@]}" --t_weights "" --name alone_cuda "${extra[@]}"
part demo_fp32 170 "${train[@]}" --noamp --name demo_cuda_fp32 "${extra[@]}"

# Results back in one archive: logs, run folders without their weights, benchmark tables.
tar -C "$work" --exclude='*.pt' --exclude='*.onnx' --exclude='*.jpg' --exclude='*.png' -czf "$out/cuda_check.tar.gz" . 2>/dev/null
awk "BEGIN {printf \"total %.1f s\n\", $EPOCHREALTIME - $start}" | tee -a "$out/summary.txt"
