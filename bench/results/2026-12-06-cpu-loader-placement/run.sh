#!/bin/bash
# Where the batched augmentation should run on a 2-core CPU: in the training process (num_workers 0) or in one
# loader worker (num_workers 1), for CIFAR-10 (32 px JPEGs) and Caltech-101 (about 300 px JPEGs), `cpu_photos`,
# 80 steps each, no checkpoint or evaluation; images/s = the median of the trainer's log lines after the first.
#   single: one run alone on both cores (the trainer's threads: 2), settings interleaved over two rounds;
#   study:  the two datasets at once, one thread each (what `bash scripts/label_efficiency.sh` does).
# Run from the repository root: bash bench/results/2026-12-06-cpu-loader-placement/run.sh OUT_DIR
set -euo pipefail
out=${1:?OUT_DIR}; mkdir -p "$out"
data=${DATA:-../shared/data}
train() {  # NAME DATASET WORKERS [env...]
  env MSN_FAST_PROGRESS=0 "${@:4}" python -m msn_fast.train --model cpu_photos --data.path "$data/$2" \
    --run.time_budget 0 --run.max_steps 80 --run.log_every 10 --run.checkpoint_every 100000 \
    --run.eval_lowshot false --data.num_workers "$3" --run.out_dir "$out/$1" > "$out/$1.log" 2>&1
}
rate() { python -c "import json,statistics,sys; r=[json.loads(l)['img_per_s'] for l in open(sys.argv[1])]; print(round(statistics.median(r[1:]),1))" "$out/$1/metrics.jsonl"; }
for round in 0 1; do
  for ds in cifar10/train caltech101; do
    n=${ds%%/*}
    for w in $([ $round = 0 ] && echo "0 1" || echo "1 0"); do
      train single_${n}_w${w}_r$round $ds $w
      echo "single $n workers $w round $round: $(rate single_${n}_w${w}_r$round) img/s"
    done
  done
done
for w in 1 0; do
  train study_cifar10_w$w cifar10/train $w OMP_NUM_THREADS=1 & train study_caltech101_w$w caltech101 $w OMP_NUM_THREADS=1 &
  wait
  echo "study workers $w: cifar10 $(rate study_cifar10_w$w) img/s, caltech101 $(rate study_caltech101_w$w) img/s"
done
