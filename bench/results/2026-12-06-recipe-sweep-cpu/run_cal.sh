#!/bin/bash
# run_cal.sh NAME MINUTES ARGS... : pre-train on the held-out-split Caltech-101 train part (/tmp/cal: train.txt),
# score on its val part (val.txt). CODE and OUT as in run.sh (defaults /work/main and /tmp/sw).
code=${CODE:-/work/main}; out=${OUT:-/tmp/sw}
cd "$code"; . /work/venv/bin/activate
if [ -n "$CODE" ]; then export PYTHONPATH=$CODE; fi
name=$1; mins=$2; shift 2
export OMP_NUM_THREADS=1
python -m msn_fast.train --data.path /tmp/cal --run.out_dir $out/$name --run.time_budget $mins \
  --run.eval_lowshot false --run.log_every 100 --data.num_workers 1 "$@" > $out/$name.log 2>&1
python -m msn_fast.eval --checkpoint $out/$name --data /tmp/cal --shots 1 2 5 --draws 10 --knn-k 0 --baselines \
  --cache $out/cache --no-progress --out $out/$name.json >> $out/$name.log 2>&1
tail -25 $out/$name.log
