#!/usr/bin/env bash
# Two training processes of one thread each against one process of two threads, on a 2-core CPU:
# the `cpu_photos` trainer on CIFAR-10's train split, 120 steps, in-process batched views, rounds alternating.
#   single:      python -m msn_fast.train, batch 32, both threads (the recipe as it runs)
#   independent: two separate 1-thread trainers of batch 16 at once, no communication (the upper bound)
#   replicated:  torchrun, 2 gloo processes x batch 16, 1 thread each, --dist.fsdp off (gradients all-reduced)
# Then the gloo all-reduce's latency between two 1-thread processes. Run from /tmp with the venv active:
#   bash /work/main/bench/results/2026-12-07-cpu-two-processes/two_processes.sh 2>&1 | tee two_processes.log
set -euo pipefail
D=${CIFAR:-/work/shared/data/cifar10/train}
COMMON="--model cpu_photos --data.path $D --run.max_steps 120 --run.log_every 10 --run.checkpoint_every 100000
        --run.eval_lowshot false --run.time_budget 0"
export MSN_FAST_PROGRESS=0
W=$(mktemp -d)
med() { python -c "import json,statistics,sys;print(round(statistics.median([json.loads(l)['img_per_s'] for l in open(sys.argv[1]+'/metrics.jsonl')][1:])))" "$1"; }
lscpu | grep "Model name"
for r in 1 2 3; do
  python -m msn_fast.train $COMMON --run.out_dir $W/single >/dev/null 2>&1
  OMP_NUM_THREADS=1 python -m msn_fast.train $COMMON --data.batch_size 16 --run.out_dir $W/ia >/dev/null 2>&1 &
  OMP_NUM_THREADS=1 python -m msn_fast.train $COMMON --data.batch_size 16 --run.seed 1 --run.out_dir $W/ib >/dev/null 2>&1
  wait
  OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m msn_fast.train $COMMON --data.batch_size 16 \
    --dist.fsdp off --run.out_dir $W/rep >/dev/null 2>&1
  s=$(med $W/single); a=$(med $W/ia); b=$(med $W/ib); p=$(med $W/rep)
  echo "round $r img/s: single $s | independent $a + $b = $((a + b)) | replicated $p" \
       "| independent/single $(python -c "print(round(($a+$b)/$s,2))") replicated/single $(python -c "print(round($p/$s,2))")"
done
cat > $W/ar.py <<'PY'
import time
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
for n in (64, 1_000_000):  # a Sinkhorn / BatchNorm statistic; the whole model's gradients
    t = torch.ones(n)
    for _ in range(20):
        dist.all_reduce(t)
    t0 = time.perf_counter()
    for _ in range(200):
        dist.all_reduce(t)
    if dist.get_rank() == 0:
        print(f"gloo all_reduce of {n} fp32 between two 1-thread processes: {(time.perf_counter() - t0) / 0.2:.2f} ms")
PY
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 $W/ar.py 2>/dev/null
rm -rf $W
