#!/bin/bash
# trab.sh: trainer s/step on Caltech-101 and the 640 px copy, before (worktree of HEAD) and after, alternating.
. /work/venv/bin/activate
cd /tmp/lam
for round in 1 2; do
 for data in /work/shared/data/caltech101 /tmp/big640/train; do
  for arm in before after; do
   if [ $arm = before ]; then export PYTHONPATH=/tmp/wt_before; else unset PYTHONPATH; fi
   out=/tmp/lam/tr_${arm}_$(basename $(dirname $data))_$(basename $data)_$round
   rm -rf $out
   python -m msn_fast.train --model cpu_photos --data.path $data --run.out_dir $out --run.max_steps 400 \
     --run.log_every 50 --run.eval_lowshot false --run.time_budget 0 > $out.log 2>&1
   python - $out.log $arm $data <<'PY'
import re, sys, datetime
lines = [l for l in open(sys.argv[1]) if re.search(r" step (\d+)/", l)]
t = {int(re.search(r" step (\d+)/", l).group(1)): datetime.datetime.strptime(l.split()[0], "%H:%M:%S") for l in lines}
print(sys.argv[2], sys.argv[3], f"{(t[400] - t[100]).total_seconds() / 300 * 1e3:.0f} ms a step (steps 100-400)")
PY
  done
 done
done
