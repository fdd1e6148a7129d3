"""python curve.py RUN_DIR: score, as run.sh does, the last checkpoint before each multiple of 15 minutes of a
60-minute run (the study's `curve_points`); writes RUN_DIR's sibling RUN_m<minutes>.json. The ninth round ran it
with its worktree first on PYTHONPATH (CODE=/tmp/wt9) and the held-out split in /tmp/c10e."""

import os
import subprocess
import sys
from pathlib import Path

from msn_fast.study import curve_points


def main(run: Path) -> None:
    for minutes, step in curve_points(run, 15.0):
        if minutes is None or minutes > 55:  # the final encoder is run.sh's own RUN.json
            continue
        out = run.parent / f"{run.name}_m{minutes:.0f}.json"
        if out.exists():
            continue
        subprocess.run([sys.executable, "-m", "msn_fast.eval", "--checkpoint", str(step), "--data", "/tmp/c10e",
                        "--shots", "1", "2", "5", "--fractions", "--draws", "10", "--knn-k", "0",
                        "--cache", str(run.parent / "cache"), "--no-progress", "--out", str(out)],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(run.name, round(minutes, 1), step.name, flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
