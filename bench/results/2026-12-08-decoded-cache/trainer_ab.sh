#!/usr/bin/env bash
# The `cpu_photos` trainer on Caltech-101's train split (5,784 images, 180 steps an epoch), 540 steps (3 epochs),
# with the decoded-image cache (the default, --data.cache_mb 1024) and without it (--data.cache_mb 0), alternating
# (A B, B A, ...), ROUNDS rounds (default 4). Images/s: median of the trainer's log lines after step 200 (epochs 2 and 3: the cache is full).
# Run from /tmp with the venv active: bash .../trainer_ab.sh 2>&1 | tee trainer_ab.log
set -euo pipefail
D=${CALTECH:-/work/shared/data/caltech101}
W=$(mktemp -d)
export MSN_FAST_PROGRESS=0
lscpu | grep "Model name"
for r in $(seq 1 ${ROUNDS:-4}); do
  order="1024 0"; [ $((r % 2)) -eq 0 ] && order="0 1024"
  for mb in $order; do
    python -m msn_fast.train --model cpu_photos --data.path "$D" --data.cache_mb $mb --run.max_steps 540 \
      --run.log_every 20 --run.checkpoint_every 100000 --run.eval_lowshot false --run.time_budget 0 \
      --run.out_dir $W/r >/dev/null 2>&1
    python - "$W/r" "$r" "$mb" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
late = [row["img_per_s"] for row in rows if row["step"] > 200]
print(f"round {sys.argv[2]} cache_mb {sys.argv[3]:>4}: {statistics.median(late):.1f} img/s (median of {len(late)} lines)")
PY
    rm -rf $W/r
  done
done
rm -rf $W
