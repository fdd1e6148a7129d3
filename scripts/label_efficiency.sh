#!/usr/bin/env bash
# The label-efficiency study (README, "Label efficiency on real data"): MSN pre-training on CIFAR-10 and
# Caltech-101 train splits within a wall-clock budget, scored on their test splits against raw pixels and
# the same ViT with random weights; writes runs/label_efficiency/report.{md,json}, accuracy plots and the
# curve of 5-shot accuracy against pre-training minutes.
#
#   bash scripts/label_efficiency.sh                          # ../shared/data, 60 minutes each, one after the other
#   bash scripts/label_efficiency.sh --minutes 20 --out /tmp/le
#   bash scripts/label_efficiency.sh --dataset photos=/data/photos   # another labelled set, same recipe
#
# Every flag is python -m msn_fast.study's (--help); trainer flags go after `--`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m msn_fast.study "$@"
