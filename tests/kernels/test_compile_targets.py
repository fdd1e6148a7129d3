"""Every Triton kernel compiles for sm_80 and sm_90 at every config, without a GPU (issue 18).

The sweep runs `msn_fast.kernels.compile_targets` (in a child Python without TRITON_INTERPRET, which
conftest sets here). By default: every kernel at its first config, head dims 64 and 32, fp16 and bf16,
sm_80 and sm_90 (about 40 s cold on a 2-core CPU, less with a warm Triton cache). The `slow` test compiles
every autotune config at every head dim and dtype, fp32 included (several minutes).
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import triton
import triton.language as tl

from msn_fast.kernels import compile_targets as ct

pytestmark = pytest.mark.skipif(ct.unavailable() is not None, reason=str(ct.unavailable()))

FAST = dict(targets=((8, 0), (9, 0)), head_dims=(64, 32), dtypes=("fp16", "bf16"))
KERNELS = (
    "attention_fwd", "attention_bwd_preprocess", "attention_bwd_dkdv", "attention_bwd_dq",
    "patch_embed_fwd", "patch_embed_bwd", "token_gather_fwd", "token_gather_bwd",
    "l2norm_fwd", "l2norm_bwd", "prototype_ce_fwd", "prototype_ce_bwd",
)  # fmt: skip


def _check(rows: list[ct.Row], sweep: dict) -> None:
    print("\n" + ct.format_table(rows))
    errors = [f"{r.kernel} [{r.config}] {r.target} {r.dtype} D={r.head_dim}: {r.status}" for r in rows
              if r.status.startswith("error")]  # fmt: skip
    assert not errors, "kernels failed to compile:\n" + "\n".join(errors)
    seen = {(r.kernel, r.target) for r in rows}
    targets = {f"sm_{a}{b}" for a, b in sweep["targets"]}
    assert seen == {(k, t) for k in KERNELS for t in targets}, "a kernel or target is missing from the report"
    for r in rows:
        if r.default:  # what runs when autotuning is off, for fp32 and on a first launch
            assert r.n_regs is not None, f"{r.kernel}: no register count (cuobjdump missing?)"
            assert r.n_spills == 0, f"{r.kernel} [{r.config}] {r.target} {r.dtype} D={r.head_dim} spills"
            assert r.status == "ok", f"{r.kernel} [{r.config}] {r.target}: {r.status}"


def test_kernel_table_is_complete():
    names = tuple(k.name for k in ct._kernels())
    assert names == KERNELS
    for k in ct._kernels():  # every kernel has at least one config for every dtype
        assert all(k.configs(dt, 64 if k.attention else None) for dt in ct.DTYPES), k.name


def test_every_kernel_compiles_for_sm80_and_sm90():
    _check(ct.compile_report(**FAST, all_configs=False), FAST)


@pytest.mark.slow
def test_every_config_compiles():
    full = dict(targets=ct.TARGETS, head_dims=ct.HEAD_DIMS, dtypes=ct.DTYPES)
    _check(ct.compile_report(**full), full)


@triton.jit
def _copy(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _broken(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    tl.store(Y + offs, x + tl.zeros([BLOCK // 2], tl.float32), mask=offs < n)  # shapes [BLOCK] vs [BLOCK/2]


def _rows_for(fn) -> list[ct.Row]:
    """fn through the same compile_row as the package sweep, on both targets."""
    rows = []
    for cap in ct.TARGETS:
        r = ct.Row(fn.__name__, "BLOCK=128 w4", f"sm_{cap[0]}{cap[1]}", "fp16", None, True)
        rows.append(ct.compile_row(r, fn, {"X": "fp16", "Y": "fp16"}, (), (), {"BLOCK": 128}, cap, 4, None))
    return rows


def test_broken_kernel_gives_error_row():
    # Triton compiles nothing in-process under TRITON_INTERPRET=1 (the kernels are interpreter objects and
    # tl ops are patched), so this file runs itself as a script without it (the __main__ block below).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, check=True)
    good, bad = ([ct.Row(**r) for r in rows] for rows in json.loads(proc.stdout))
    print("\n" + ct.format_table(good + bad))
    assert all(r.status == "ok" and r.n_regs and r.n_spills == 0 for r in good), "control kernel failed"
    assert all(r.status.startswith("error: CompilationError") and r.n_regs is None for r in bad)


if __name__ == "__main__":
    print(json.dumps([[asdict(r) for r in _rows_for(fn)] for fn in (_copy, _broken)]))
