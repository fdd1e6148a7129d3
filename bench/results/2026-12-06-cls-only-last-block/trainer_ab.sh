#!/bin/bash
# Three interleaved rounds of trainer_ab.py old / new (see its docstring); prints each run's median images/s.
here=$(cd "$(dirname "$0")" && pwd)
cd /tmp; . /work/venv/bin/activate
export MSN_FAST_PROGRESS=0
for r in 0 1 2; do
  for v in old new; do
    [ $r = 1 ] && v=$([ $v = old ] && echo new || echo old)
    rm -rf /tmp/tab/$v$r; python "$here/trainer_ab.py" $v /tmp/tab/$v$r > /tmp/tab/$v$r.log 2>&1
    python -c "import json,statistics as s;r=[json.loads(l)['img_per_s'] for l in open('/tmp/tab/$v$r/metrics.jsonl')][1:];print('$v$r', round(s.median(r),1))"
  done
done
