#!/bin/bash
# run.sh NAME MINUTES ARGS... : pre-train on the held-out-split CIFAR-10 train part, then score on its val part
cd /work/main; . /work/venv/bin/activate
name=$1; mins=$2; shift 2
export OMP_NUM_THREADS=1
python -m msn_fast.train --data.path /tmp/c10 --run.out_dir /tmp/sw/$name --run.time_budget $mins \
  --run.eval_lowshot false --run.log_every 100 --data.num_workers 1 "$@" > /tmp/sw/$name.log 2>&1
python -m msn_fast.eval --checkpoint /tmp/sw/$name --data /tmp/c10e --shots 1 2 5 --fractions --draws 10 --knn-k 0 \
  --cache /tmp/sw/cache --no-progress --out /tmp/sw/$name.json >> /tmp/sw/$name.log 2>&1
tail -5 /tmp/sw/$name.log
