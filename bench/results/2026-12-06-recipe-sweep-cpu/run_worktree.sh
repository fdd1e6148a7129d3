#!/bin/bash
# run.sh NAME MINUTES ARGS... : as bench/results/2026-12-06-recipe-sweep-cpu/run.sh, code from the worktree /tmp/wt_sweep
cd /tmp/wt_sweep; . /work/venv/bin/activate; export PYTHONPATH=/tmp/wt_sweep
name=$1; mins=$2; shift 2
export OMP_NUM_THREADS=1
python -m msn_fast.train --data.path /tmp/c10 --run.out_dir /tmp/sw7/$name --run.time_budget $mins \
  --run.eval_lowshot false --run.log_every 100 --data.num_workers 1 "$@" > /tmp/sw7/$name.log 2>&1
python -m msn_fast.eval --checkpoint /tmp/sw7/$name --data /tmp/c10e --shots 1 2 5 --fractions --draws 10 --knn-k 0 \
  --cache /tmp/sw7/cache --no-progress --out /tmp/sw7/$name.json >> /tmp/sw7/$name.log 2>&1
tail -5 /tmp/sw7/$name.log
