#!/usr/bin/env bash
# GPU check of msn-fast on a fresh CUDA machine: correctness tests, then the benchmarks; results under OUT.
#
#   bash bench/gpu_check.sh [OUT] [--only P1,P2] [--skip P1,P2] [--force] [--with-unit] [--budget S] [--allow-cpu]
#
# OUT defaults to bench/results/<UTC date>. Phases, in order (each one command, logged to OUT/logs/P.log):
#   env             env.json: date, GPU, driver, torch/triton/python versions, git commit, this command
#   check           python -m msn_fast.check --model vit_l7 --out OUT/check.json: versions, every kernel vs its
#                   torch reference at ViT-L/7 shapes, timings, rooflines, the training step, the compile table
#   tests           pytest tests -m gpu: the kernel tests at real shapes (and any other gpu-marked test)
#   unit            (only with --with-unit) pytest tests/kernels -m "not gpu": small-shape kernel tests on the GPU
#   bench_train_step, bench_attention, bench_prototype_loss, bench_patch_embed, bench_dataloader (when present):
#                   pytest bench/test_<name>.py --benchmark-only --benchmark-json=OUT/bench_<name>.json
#                   (train step: also OUT/train_step_summary.json and OUT/train_step.png)
# --budget S (default 480): the whole run stops, failing, after S seconds; each phase gets at most its own
# limit (LIMIT below) and what is left of the budget, so a rerun finishes the phases that were cut.
# A phase that passed leaves OUT/.done_<phase>; running again with the same OUT skips it (--force reruns
# everything, --only picks phases). Triton's cache is kept in $TRITON_CACHE_DIR (default
# ~/.cache/msn_fast/triton), so a rerun does not recompile. Any failing test or benchmark assertion (every
# benchmark checks correctness before timing) stops the script with a non-zero exit and names the log.
# Needs: torch with CUDA, triton, pytest, pytest-benchmark (matplotlib optional, for the plot). The package
# need not be installed: `pip install -e . --no-deps --no-build-isolation` is tried, then a PYTHONPATH tree.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
START=$(date +%s)
CMD="bash bench/gpu_check.sh $*"

OUT="" ONLY="" SKIP="" FORCE=0 WITH_UNIT=0 ALLOW_CPU=0 BUDGET=480
while [[ $# -gt 0 ]]; do
  case "$1" in
    --only) ONLY="$2"; shift 2 ;;
    --only=*) ONLY="${1#*=}"; shift ;;
    --skip) SKIP="$2"; shift 2 ;;
    --skip=*) SKIP="${1#*=}"; shift ;;
    --force) FORCE=1; shift ;;
    --with-unit) WITH_UNIT=1; shift ;;
    --allow-cpu) ALLOW_CPU=1; shift ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --budget=*) BUDGET="${1#*=}"; shift ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) if [[ -n "$OUT" ]]; then echo "gpu_check: two output folders given: $OUT and $1" >&2; exit 2; fi
       OUT="$1"; shift ;;
  esac
done
OUT="${OUT:-bench/results/$(date -u +%Y-%m-%d)}"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
PYFLAGS=""
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/msn_fast/triton}"
export MSN_BENCH_OUT="$OUT" PYTHONDONTWRITEBYTECODE=1
mkdir -p "$TRITON_CACHE_DIR"

PHASES=()
declare -A STATUS=() SECONDS_TAKEN=()
die() { echo "" >&2; echo "gpu_check: FAILED: $*" >&2; write_summary >/dev/null 2>&1 || true; exit 1; }
elapsed() { echo $(( $(date +%s) - START )); }

# --- the package: installed, editable-installed here, or a PYTHONPATH tree -------------------------------
importable() { (cd /tmp && "$PY" -c "import msn_fast.kernels, msn_fast.dataloading, msn_fast.train" 2>/dev/null); }
if ! importable; then
  echo "gpu_check: msn_fast not importable; pip install -e . --no-deps --no-build-isolation"
  if ! "$PY" -m pip install -e . --no-deps --no-build-isolation -q >"$OUT/logs/install.log" 2>&1 || ! importable; then
    # setup.py maps kernels/ and dataloading/ into msn_fast: rebuild that layout with symlinks
    TREE="${TMPDIR:-/tmp}/msn_fast_pythonpath"
    rm -rf "$TREE" && mkdir -p "$TREE/msn_fast"
    for f in "$REPO"/msn_fast/*.py; do ln -s "$f" "$TREE/msn_fast/"; done
    ln -s "$REPO/kernels" "$TREE/msn_fast/kernels"
    ln -s "$REPO/dataloading" "$TREE/msn_fast/dataloading"
    export PYTHONPATH="$TREE${PYTHONPATH:+:$PYTHONPATH}"
    # neither python -m (-P: no cwd on sys.path) nor pytest (append mode) may put the repo root, with its
    # unmapped msn_fast/, ahead of the tree
    export PYTEST_ADDOPTS="--import-mode=append ${PYTEST_ADDOPTS:-}" PYFLAGS="-P"
    importable || die "cannot import msn_fast (pip install failed, see $OUT/logs/install.log; PYTHONPATH tree failed)"
    echo "gpu_check: using PYTHONPATH tree $TREE"
  fi
fi
"$PY" -c "import pytest" 2>/dev/null || die "pytest is not installed (needed for every phase)"
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [[ "$HAS_CUDA" != 1 && "$ALLOW_CPU" != 1 ]]; then
  die "torch sees no CUDA device (nvidia-smi? CUDA_VISIBLE_DEVICES?). --allow-cpu runs the CPU variants instead"
fi

# --- phases ------------------------------------------------------------------------------------------------
PHASES=(env check tests)
[[ "$WITH_UNIT" == 1 ]] && PHASES+=(unit)
for b in train_step attention prototype_loss patch_embed dataloader; do
  [[ -f "bench/test_$b.py" ]] && PHASES+=("bench_$b")
done
declare -A LIMIT=([env]=60 [check]=120 [tests]=150 [unit]=150 [bench_attention]=120 [bench_patch_embed]=60
                  [bench_prototype_loss]=60 [bench_dataloader]=60 [bench_train_step]=240)

write_summary() {  # OUT/gpu_check.json: each phase's status and seconds
  [[ ${#PHASES[@]} -gt 0 ]] || return 0
  for p in "${PHASES[@]}"; do echo "$p ${STATUS[$p]:-not-run} ${SECONDS_TAKEN[$p]:-}"; done \
    | "$PY" -c '
import json, sys
out, cmd, total = sys.argv[1:4]
phases = {}
for line in sys.stdin:
    name, status, *secs = line.split()
    phases[name] = {"status": status, "seconds": int(secs[0]) if secs else None}
summary = {"command": cmd, "out": out, "total_seconds": int(total), "phases": phases}
json.dump(summary, open(out + "/gpu_check.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
' "$OUT" "$CMD" "$(elapsed)"
}

in_list() { [[ ",$2," == *",$1,"* ]]; }
selected() {
  if [[ -n "$ONLY" ]]; then in_list "$1" "$ONLY"; return; fi
  ! in_list "$1" "$SKIP"
}

write_env() {
  "$PY" - "$OUT/env.json" "$CMD" <<'EOF'
import datetime, json, platform, subprocess, sys
import torch
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:
        return None
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
cuda = torch.cuda.is_available()
env = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "gpu": torch.cuda.get_device_name() if cuda else None,
    "gpu_count": torch.cuda.device_count() if cuda else 0,
    "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
    "driver": run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
    "python": platform.python_version(), "platform": platform.platform(),
    "git_commit": run("git", "rev-parse", "HEAD"), "git_dirty": bool(run("git", "status", "--porcelain")),
    "command": sys.argv[2],
}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
EOF
}

phase_cmd() {
  case "$1" in
    env) write_env ;;
    check) "$PY" $PYFLAGS -m msn_fast.check --model vit_l7 --out "$OUT/check.json" ;;
    tests) "$PY" $PYFLAGS -m pytest tests -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/tests_gpu.xml" ;;
    unit) "$PY" $PYFLAGS -m pytest tests/kernels -m "not gpu" -q -p no:cacheprovider --junitxml="$OUT/tests_unit.xml" ;;
    bench_*)
      "$PY" -c "import pytest_benchmark" 2>/dev/null || { echo "pytest-benchmark is not installed"; return 3; }
      local name="${1#bench_}"
      "$PY" $PYFLAGS -m pytest "bench/test_$name.py" --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$OUT/bench_$name.json" ;;
  esac
}

for p in "${PHASES[@]}"; do
  selected "$p" || { STATUS[$p]=skipped; continue; }
  if [[ -f "$OUT/.done_$p" && "$FORCE" != 1 && -z "$ONLY" ]]; then
    echo "gpu_check: $p passed before ($OUT/.done_$p): skipped (--force to rerun)"; STATUS[$p]=passed-before; continue
  fi
  left=$(( BUDGET - $(elapsed) ))
  limit=$(( ${LIMIT[$p]} < left ? ${LIMIT[$p]} : left ))
  (( limit >= 20 )) || die "the ${BUDGET}s budget is spent before $p; rerun with the same OUT to finish" \
    "(passed phases are skipped)"
  echo "=== gpu_check: $p (limit ${limit}s, $(elapsed)s in) ==="
  t0=$(date +%s)
  set +e
  ( set -o pipefail; export -f phase_cmd write_env; export PY PYFLAGS OUT CMD
    timeout -k 10 "$limit" bash -c "phase_cmd $p" 2>&1 | tee "$OUT/logs/$p.log" )
  rc=$?
  set -e
  SECONDS_TAKEN[$p]=$(( $(date +%s) - t0 ))
  if [[ $rc -ne 0 ]]; then
    STATUS[$p]="failed:$rc"
    [[ $rc -eq 124 || $rc -eq 137 ]] && die "$p ran past its ${limit}s limit; log: $OUT/logs/$p.log"
    die "$p exited with $rc (a failing test, a correctness check or an error); log: $OUT/logs/$p.log"
  fi
  STATUS[$p]=passed
  touch "$OUT/.done_$p"
done

write_summary
echo "=== gpu_check: all selected phases passed in $(elapsed)s; results in $OUT ==="
