"""Trainer-level A/B of the CLS-only last block: `python trainer_ab.py old|new OUT` runs msn_fast.train.main with
the full last block (old: `forward_features(x)[:, 0]`) or the CLS-only one (new), cpu_demo on CIFAR-10 train
(the path as on the machine that ran it), 120 steps, the batched views in the training process. Run by
trainer_ab.sh (from /tmp, so that the installed msn_fast.dataloading resolves), which writes under /tmp/tab
(make it first) and prints each run's median images/s; its output is trainer_ab.txt, the runs' metrics logs/.
"""
import sys

from msn_fast import vit
from msn_fast.train import main

if sys.argv[1] == "old":
    vit.VisionTransformer.forward = lambda self, x, keep_idx=None: self.forward_features(x, keep_idx)[:, 0]
sys.exit(main(["--model", "cpu_demo", "--data.path", "/work/shared/data/cifar10/train", "--run.max_steps", "120",
               "--run.log_every", "10", "--run.checkpoint_every", "100000", "--run.eval_lowshot", "false",
               "--run.out_dir", sys.argv[2]]))
