#!/usr/bin/env bash
# Reproduce the published VisDrone distillation table (yolov5m student, 100 epochs, 640 and 1280 px)
# with this repository, plus one extra row with our recommended feature distillation (PKD).
# See docs/VISDRONE.md for what each step does and the figures to compare to.
#
#   DRY_RUN=1 bash scripts/visdrone_experiments.sh          # print every command, run nothing
#   bash scripts/visdrone_experiments.sh                    # everything (days on one GPU)
#   ONLY="m640 x640 m640_kd_x640 m640_pkd_x640" bash scripts/visdrone_experiments.sh   # a subset
#   STEPS="val summary" bash scripts/visdrone_experiments.sh                            # re-validate only
#
# Settings (environment variables):
#   EPOCHS=100  DEVICE=0  BATCH=16 (640 px)  BATCH_1280=4  WORKERS=8  SEED=0
#   DATA_DIR=../datasets/VisDrone   holds VisDrone2019-DET-{train,val,test-dev}/{images,annotations}
#   PROJECT=runs/visdrone           run folders: $PROJECT/<run>/weights/best.pt, $PROJECT/val/<run>/metrics.json
#   WEIGHTS_DIR=weights             where yolov5m.pt / yolov5x.pt (official COCO v7.0) are put
#   HYP=data/hyps/hyp.scratch-low.yaml   VAL_TASK=val (or test: VisDrone2019-DET-test-dev)
#   STEPS="prepare weights train val summary"   ONLY="<run names>" (default: all runs)
#   DRY_RUN=1                       print the commands only
# Finished runs (best.pt present) are not trained again: delete the run folder to redo one.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

EPOCHS=${EPOCHS:-100}
DEVICE=${DEVICE:-0}
BATCH=${BATCH:-16}
BATCH_1280=${BATCH_1280:-4}
WORKERS=${WORKERS:-8}
SEED=${SEED:-0}
DATA_DIR=${DATA_DIR:-../datasets/VisDrone}
PROJECT=${PROJECT:-runs/visdrone}
WEIGHTS_DIR=${WEIGHTS_DIR:-weights}
HYP=${HYP:-data/hyps/hyp.scratch-low.yaml}
VAL_TASK=${VAL_TASK:-val}
STEPS=${STEPS:-prepare weights train val summary}
ONLY=${ONLY:-}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}

SPLITS=(VisDrone2019-DET-train VisDrone2019-DET-val VisDrone2019-DET-test-dev)

# Runs, in training order (teachers before their students):
#   name | imgsz | initial weights | teacher run ('-' = none) | distillation flags | published mAP50 | mAP50-95
# Published figures (REFERENCE.md §7): yolov5m student, 100 epochs, the Adlik fork's output distillation:
# objmse terms x hyp gains x 10, NOT multiplied by the batch size, constant weight = our
# `--d_output adlik --d_weight 10 --d_schedule const`. Our own default (`--d_output objmse`: x batch
# size, cosine schedule) is the separate, named extra row m640_objmse_x640.
RUNS=(
  "m640|640|yolov5m|-|-|0.320|0.181"
  "x640|640|yolov5x|-|-|-|-"
  "m1280|1280|yolov5m|-|-|0.448|0.261"
  "x1280|1280|yolov5x|-|-|-|-"
  "m640_kd_m640|640|yolov5m|m640|--d_output adlik --d_weight 10 --d_schedule const|0.305|0.163"
  "m640_kd_x640|640|yolov5m|x640|--d_output adlik --d_weight 10 --d_schedule const|0.302|0.161"
  "m1280_kd_x1280|1280|yolov5m|x1280|--d_output adlik --d_weight 10 --d_schedule const|0.401|0.230"
  "m640_pkd_x640|640|yolov5m|x640|--d_output none --d_feature pkd|-|-"
  "m640_objmse_x640|640|yolov5m|x640|--d_output objmse|-|-"
)

log() { printf '\n== %s\n' "$*"; }

# Print a command (shell-quoted, copy-pasteable), then run it unless DRY_RUN=1.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

want_step() { [[ " $STEPS " == *" $1 "* ]]; }

want_run() { [[ -z "$ONLY" || " $ONLY " == *" $1 "* ]]; }

# The dataset yaml: data/VisDrone.yaml expects ../datasets/VisDrone; another DATA_DIR gets a copy of
# it with `path:` pointing there.
DATA=data/VisDrone.yaml
if [[ "$DATA_DIR" != "../datasets/VisDrone" ]]; then
  DATA="$PROJECT/VisDrone.yaml"
  if [[ "$DRY_RUN" != 1 ]]; then
    if [[ ! -d "$DATA_DIR" ]]; then
      echo "error: DATA_DIR=$DATA_DIR is not a folder; see docs/VISDRONE.md for the download" >&2
      exit 1
    fi
    mkdir -p "$PROJECT"
    abs_dir=$(cd "$DATA_DIR" && pwd)
    sed "s#^path: .*#path: ${abs_dir}#" data/VisDrone.yaml >"$DATA"
  fi
  echo "dataset yaml: $DATA (path: $DATA_DIR)"
fi

best_of() { echo "$PROJECT/$1/weights/best.pt"; }

# ---------------------------------------------------------------------------------------------- 1
if want_step prepare; then
  log "1. data: VisDrone2019-DET train/val/test-dev in $DATA_DIR, converted to YOLO labels"
  if [[ "$DRY_RUN" != 1 ]]; then
    for split in "${SPLITS[@]}"; do
      if [[ ! -d "$DATA_DIR/$split/images" || ! -d "$DATA_DIR/$split/annotations" ]]; then
        echo "error: $DATA_DIR/$split/{images,annotations} not found. Download VisDrone2019-DET-train.zip," \
          "-val.zip and -test-dev.zip (Task 1, github.com/VisDrone/VisDrone-Dataset), unzip them into" \
          "$DATA_DIR, or set DATA_DIR. See docs/VISDRONE.md." >&2
        exit 1
      fi
    done
  fi
  run "$PYTHON" data/scripts/visdrone2yolo.py --dir "$DATA_DIR"
fi

# ---------------------------------------------------------------------------------------------- 2
if want_step weights; then
  log "2. official COCO-pretrained starting weights (YOLOv5 v7.0 release)"
  run "$PYTHON" weights/download.py yolov5m yolov5x --dir "$WEIGHTS_DIR"
fi

# ---------------------------------------------------------------------------------------------- 3
if want_step train; then
  log "3. training: baselines/teachers first (from COCO weights), then the distilled students"
  for spec in "${RUNS[@]}"; do
    IFS='|' read -r name imgsz init teacher kd _pub50 _pub <<<"$spec"
    want_run "$name" || continue
    if [[ -f "$(best_of "$name")" ]]; then
      echo "skip $name: $(best_of "$name") exists"
      continue
    fi
    bs=$BATCH
    [[ "$imgsz" == 1280 ]] && bs=$BATCH_1280
    cmd=("$PYTHON" train_distill.py --weights "$WEIGHTS_DIR/$init.pt" --data "$DATA" --hyp "$HYP"
      --imgsz "$imgsz" --epochs "$EPOCHS" --batch-size "$bs" --device "$DEVICE" --workers "$WORKERS"
      --seed "$SEED" --project "$PROJECT" --name "$name" --exist-ok)
    if [[ "$teacher" != "-" ]]; then
      t_best=$(best_of "$teacher")
      if [[ "$DRY_RUN" != 1 && ! -f "$t_best" ]]; then
        echo "error: run $name needs its teacher $t_best; train run '$teacher' first (ONLY=\"$teacher $name\")" >&2
        exit 1
      fi
      read -r -a kd_flags <<<"$kd"
      cmd+=(--t_weights "$t_best" "${kd_flags[@]}")
    fi
    run "${cmd[@]}"
  done
fi

# ---------------------------------------------------------------------------------------------- 4
if want_step val; then
  log "4. validation of each run's best.pt ($VAL_TASK split) → $PROJECT/val/<run>/metrics.json"
  for spec in "${RUNS[@]}"; do
    IFS='|' read -r name imgsz _init _teacher _kd _pub50 _pub <<<"$spec"
    want_run "$name" || continue
    if [[ "$DRY_RUN" != 1 && ! -f "$(best_of "$name")" ]]; then
      echo "skip $name: no $(best_of "$name") yet"
      continue
    fi
    run "$PYTHON" val.py --weights "$(best_of "$name")" --data "$DATA" --imgsz "$imgsz" --task "$VAL_TASK" \
      --batch-size 16 --device "$DEVICE" --workers "$WORKERS" --project "$PROJECT/val" --name "$name" --exist-ok
  done
fi

# ---------------------------------------------------------------------------------------------- 5
if want_step summary; then
  log "5. summary: our figures next to the published ones → $PROJECT/summary.md"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ (collect $PROJECT/val/<run>/metrics.json keys mAP50, mAP50-95 into $PROJECT/summary.md)"
  else
    "$PYTHON" - "$PROJECT" "$VAL_TASK" "${RUNS[@]}" <<'PY'
"""Read each run's val.py metrics.json and write a markdown table beside the published figures."""
import json
import sys
from pathlib import Path

project, task = Path(sys.argv[1]), sys.argv[2]
rows = [
    "| run | imgsz | teacher | distillation | mAP50 | mAP50-95 | published mAP50 | published mAP50-95 |",
    "|---|---:|---|---|---:|---:|---:|---:|",
]
for spec in sys.argv[3:]:
    name, imgsz, init, teacher, kd, pub50, pub = spec.split("|")
    path = project / "val" / name / "metrics.json"
    if path.is_file():
        m = json.loads(path.read_text())
        ours50, ours = f"{m['mAP50']:.3f}", f"{m['mAP50-95']:.3f}"
    else:
        ours50 = ours = "not run"
    rows.append(f"| {name} ({init}) | {imgsz} | {teacher} | {kd} | {ours50} | {ours} | {pub50} | {pub} |")
text = "\n".join([f"# VisDrone2019-DET ({task} split): yolov5m student, our runs vs. published", "", *rows, ""])
project.mkdir(parents=True, exist_ok=True)  # the summary of no runs yet is a table of "not run"
(project / "summary.md").write_text(text)
print(text)
PY
  fi
fi
