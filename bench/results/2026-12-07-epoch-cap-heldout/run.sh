#!/bin/bash
# Does cpu_photos' 100-epoch cap cost a small photo set its budget? 600 held-out CIFAR-10 train images (60 a class),
# a 15-minute budget, both cores, one run after the other: the cap (stops at 100 epochs) against --optim.epochs 1000.
. /work/venv/bin/activate; cd /tmp; mkdir -p /tmp/cap
for arm in cap100 cap1000; do
  extra=""; [ $arm = cap1000 ] && extra="--optim.epochs 1000"
  python -m msn_fast.train --model cpu_photos --data.path /tmp/c10s --run.out_dir /tmp/cap/$arm --run.time_budget 15 \
    --run.eval_lowshot false --run.log_every 100 $extra > /tmp/cap/$arm.log 2>&1
  python -m msn_fast.eval --checkpoint /tmp/cap/$arm --data /tmp/c10e --shots 1 2 5 --draws 10 --knn-k 0 \
    --cache /tmp/cap/cache --no-progress --out /tmp/cap/$arm.json >> /tmp/cap/$arm.log 2>&1
  grep -h "training done\|took" /tmp/cap/$arm.log; tail -6 /tmp/cap/$arm.log
done
