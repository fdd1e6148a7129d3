#!/bin/bash
# run.sh NAME MINUTES ARGS... : pre-train on the held-out-split CIFAR-10 train part, then score on its val part.
# CODE: the checkout to run (default /work/main; another one, e.g. a `git worktree` of an older commit with
# msn_fast/dataloading and msn_fast/kernels linked to ../dataloading and ../kernels, goes first on PYTHONPATH);
# OUT: where runs, logs, reports and the feature cache go (default /tmp/sw).
code=${CODE:-/work/main}; out=${OUT:-/tmp/sw}
cd "$code"; . /work/venv/bin/activate
if [ -n "$CODE" ]; then export PYTHONPATH=$CODE; fi
name=$1; mins=$2; shift 2
export OMP_NUM_THREADS=1
python -m msn_fast.train --data.path /tmp/c10 --run.out_dir $out/$name --run.time_budget $mins \
  --run.eval_lowshot false --run.log_every 100 --data.num_workers 1 "$@" > $out/$name.log 2>&1
python -m msn_fast.eval --checkpoint $out/$name --data /tmp/c10e --shots 1 2 5 --fractions --draws 10 --knn-k 0 \
  --cache $out/cache --no-progress --out $out/$name.json >> $out/$name.log 2>&1
tail -5 $out/$name.log
