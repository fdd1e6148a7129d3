#!/bin/bash
# (kept as run on 2026-12-06, paths written in; see ../README.md)
for r in 1 2; do
  echo "round $r base $(date +%T)"; PYTHONPATH=/tmp/et/base_wt /work/venv/bin/python evalt2.py /tmp/et/cb > /tmp/et/ab_base_$r.log 2>&1; grep TOTAL /tmp/et/ab_base_$r.log
  echo "round $r new $(date +%T)"; /work/venv/bin/python evalt2.py /tmp/et/cn > /tmp/et/ab_new_$r.log 2>&1; grep TOTAL /tmp/et/ab_new_$r.log
done
