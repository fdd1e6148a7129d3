#!/bin/bash
# ab.sh BASE_WORKTREE CHECKPOINT DATA: the evaluation at BASE_WORKTREE's code and at the installed msn_fast's,
# alternately, two rounds. BASE_WORKTREE is `git worktree add DIR REV` with msn_fast/dataloading and
# msn_fast/kernels symlinked to ../dataloading and ../kernels (the editable install maps them; PYTHONPATH does not).
here=$(cd "$(dirname "$0")" && pwd)
base=$1; ckpt=$2; data=$3
for r in 1 2; do
  echo "round $r base $(date +%T)"
  PYTHONPATH=$base python "$here/eval_timing.py" "$ckpt" "$data" /tmp/eval_ab_cache > "$here/logs/base_$r.log" 2>&1
  grep TOTAL "$here/logs/base_$r.log"
  echo "round $r new $(date +%T)"
  python "$here/eval_timing.py" "$ckpt" "$data" /tmp/eval_ab_cache > "$here/logs/new_$r.log" 2>&1
  grep TOTAL "$here/logs/new_$r.log"
done
