#!/bin/bash
# Trainer ms/step on CIFAR-10, cpu_photos, before (worktree of de57fbc) and after, alternating, 3 rounds.
. /work/venv/bin/activate
cd /tmp/tab
for round in 1 2 3; do
  for arm in before after; do
   if [ $arm = before ]; then export PYTHONPATH=/tmp/wt_before; else unset PYTHONPATH; fi
   out=/tmp/tab/tr_${arm}_$round
   rm -rf $out
   python -m msn_fast.train --model cpu_photos --data.path /work/shared/data/cifar10 --run.out_dir $out --run.max_steps 400 \
     --run.log_every 50 --run.eval_lowshot false --run.time_budget 0 > $out.log 2>&1
   python - $out.log $arm <<'PY'
import re, sys, datetime
lines = [l for l in open(sys.argv[1]) if re.search(r" step (\d+)/", l)]
t = {int(re.search(r" step (\d+)/", l).group(1)): datetime.datetime.strptime(l.split()[0], "%H:%M:%S") for l in lines}
print(sys.argv[2], f"{(t[400] - t[100]).total_seconds() / 300 * 1e3:.0f} ms a step (steps 100-400)", flush=True)
PY
  done
done
