#!/bin/bash
# run_cal.sh NAME MINUTES ARGS... : pre-train on the held-out-split Caltech-101 train part, score on its val part
cd /work/main; . /work/venv/bin/activate
name=$1; mins=$2; shift 2
export OMP_NUM_THREADS=1
python -m msn_fast.train --data.path /tmp/cal --run.out_dir /tmp/sw/$name --run.time_budget $mins \
  --run.eval_lowshot false --run.log_every 100 --data.num_workers 1 "$@" > /tmp/sw/$name.log 2>&1
python -m msn_fast.eval --checkpoint /tmp/sw/$name --data /tmp/cal --shots 1 2 5 --draws 10 --knn-k 0 --baselines \
  --cache /tmp/sw/cache --no-progress --out /tmp/sw/$name.json >> /tmp/sw/$name.log 2>&1
tail -25 /tmp/sw/$name.log
