"""Compile every Triton kernel of msn_fast.kernels for GPUs this machine need not have (issue 18).

`compile_report()` builds each kernel with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`
(ptxas as shipped with Triton; no GPU and no driver needed) at each autotune config, or at the launcher's
settings for the heuristic kernels, per target, dtype and attention head dim. Registers and spills come
from the cubin through the `cuobjdump --dump-resource-usage` Triton ships (the driver fills `n_regs` and
`n_spills` only at load time; as there, n_spills = local bytes / 4), shared memory from `metadata.shared`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable

import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from ._utils import interpreting, next_power_of_2

TARGETS = ((8, 0), (9, 0))
HEAD_DIMS = (32, 64, 80, 96, 128)  # attention.SUPPORTED_HEAD_DIMS; 80, 96, 128 share BLOCK_D = 128
DTYPES = ("fp16", "bf16", "fp32")
SMEM_LIMIT = {80: 166912, 90: 232448}  # opt-in shared memory per block (bytes), CUDA programming guide
# Shapes behind the heuristic launch settings: ViT-S/16 (width 384, 166 of 196 patches kept, batch 64) and
# the MSN head (1024 prototypes of dim 256), as in the vits16_msn recipe.
WIDTH, PATCH, KDIM, KEPT_ROWS, PROTOS, OUT_DIM = 384, 16, 3 * 16 * 16, 64 * 166, 1024, 256

Config = tuple[dict[str, Any], int, "int | None"]  # (constexpr values, num_warps, num_stages or None)


@dataclass
class Row:
    """One compile: kernel at one config on one target. regs/spills/shared are None when unknown."""

    kernel: str
    config: str  # "BLOCK_M=64 BLOCK_N=32 w4 s3": the tuned constexprs, warps, stages
    target: str  # "sm_90"
    dtype: str  # the swept tensor dtype; fp32 for kernels whose tensors are all fp32
    head_dim: int | None  # attention only
    default: bool  # the first (or only) config: what MSN_FAST_AUTOTUNE=0, fp32 and the interpreter run
    n_regs: int | None = None  # registers per thread
    n_spills: int | None = None  # 4-byte words of local memory per thread (Triton's n_spills)
    shared: int | None = None  # dynamic shared memory per program, bytes
    status: str = "ok"  # "ok", "over smem ...", "error: ..." or "skipped: ..."


@dataclass(frozen=True)
class _Kernel:
    name: str
    obj: Any  # a JITFunction or an Autotuner around one
    ptrs: dict[str, str]  # pointer argument -> element type; "x" is the swept dtype
    unit: tuple[str, ...]  # strides that are 1 for contiguous tensors (the launch specialises them to 1)
    floats: tuple[str, ...]  # fp32 scalar arguments
    configs: Callable[[str, int | None], list[Config]]  # (dtype, head_dim) -> configs
    attention: bool = False


def _kernels() -> list[_Kernel]:
    """The explicit table. Other ints are i32, with a multiple-of-16 hint for strides and HEAD_DIM."""
    at, pe, pl, tg = (_module(m) for m in ("attention_triton", "patch_embed", "prototype_ce_triton", "token_gather"))

    def tuned(configs: list[triton.Config]) -> Callable[[str, int | None], list[Config]]:
        def make(dtype: str, d: int | None) -> list[Config]:
            base = {"BLOCK_D": next_power_of_2(d), "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
            kept = configs[:1] if dtype == "fp32" else configs  # the pruner gives fp32 the first config only
            return [({**base, **c.kwargs}, c.num_warps, c.num_stages) for c in kept]

        return make

    def fixed(*configs: Config) -> Callable[[str, int | None], list[Config]]:
        return lambda dtype, d: [(dict(c), w, s) for c, w, s in configs]

    def pre(dtype: str, d: int | None) -> list[Config]:
        return [({"BLOCK_D": next_power_of_2(d), "BLOCK_M": at.PRE_BLOCK_M}, 4, None)]

    def patch_fwd(dtype: str, d: int | None) -> list[Config]:  # values of patch_embed_fwd
        bm, bn, bk, warps, stages = pe._gemm_settings(WIDTH, KDIM)
        flags = {"PATCH": PATCH, "KDIM": KDIM, "HAS_BIAS": True, "HAS_POS": True}
        blocks = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        return [({**flags, "PRECISION": "ieee" if dtype == "fp32" else "tf32", **blocks}, warps, stages)]

    gm, gd, gw = tg._tiles(WIDTH, KEPT_ROWS)  # token_gather's launchers: (D, B*K)
    im, ik, iw = pe._im2col_settings(KEPT_ROWS, KDIM)
    rm, rd, rw = pl._tile(OUT_DIM, None)  # l2norm rows of the embeddings or prototypes
    km, kk, kw = pl._tile(PROTOS, None)  # whole rows of logits
    attn_unit = tuple(f"stride_{t}d" for t in ("q", "k", "v", "o", "do", "dk", "dv", "dq"))
    qkv = {"Q": "x", "K": "x", "V": "x", "DO": "x", "LSE": "fp32", "Delta": "fp32"}
    f32 = "fp32"
    return [
        _Kernel("attention_fwd", at._attention_fwd_kernel, {**qkv, "Out": "x"}, attn_unit, ("qk_scale",),
                tuned(at.FWD_CONFIGS), True),
        _Kernel("attention_bwd_preprocess", at._attention_bwd_preprocess_kernel,
                {"Out": "x", "DO": "x", "Delta": f32}, attn_unit, (), pre, True),
        _Kernel("attention_bwd_dkdv", at._attention_bwd_dkdv_kernel, {**qkv, "DK": "x", "DV": "x"}, attn_unit,
                ("qk_scale", "sm_scale"), tuned(at.DKDV_CONFIGS), True),
        _Kernel("attention_bwd_dq", at._attention_bwd_dq_kernel, {**qkv, "DQ": "x"}, attn_unit,
                ("qk_scale", "sm_scale"), tuned(at.DQ_CONFIGS), True),
        _Kernel("patch_embed_fwd", pe._patch_embed_fwd_kernel,
                {"X": "x", "Idx": "i64", "W": "x", "Bias": "x", "Pos": "x", "Out": "x"},
                ("stride_xw", "stride_it", "stride_wk", "stride_pd", "stride_od"), (), patch_fwd),
        _Kernel("patch_embed_bwd", pe._patch_embed_bwd_kernel, {"X": "x", "Idx": "i64", "A": "x"},
                ("stride_xw", "stride_it", "stride_ak"), (),
                fixed(({"PATCH": PATCH, "KDIM": KDIM, "BLOCK_M": im, "BLOCK_K": ik}, iw, None))),
        _Kernel("token_gather_fwd", tg._token_gather_fwd_kernel, {"X": "x", "Idx": "i64", "Pos": "x", "Out": "x"},
                ("stride_xd", "stride_it", "stride_pd", "stride_od"), (),
                fixed(({"HAS_POS": True, "BLOCK_M": gm, "BLOCK_D": gd}, gw, None))),
        _Kernel("token_gather_bwd", tg._token_gather_bwd_kernel, {"DY": "x", "Idx": "i64", "DX": "x"},
                ("stride_yd", "stride_it", "stride_xd"), (), fixed(({"BLOCK_M": gm, "BLOCK_D": gd}, gw, None))),
        _Kernel("l2norm_fwd", pl._l2norm_fwd_kernel, {"X": "x", "Y": f32}, ("stride_xd",), (),
                fixed(({"BLOCK_M": rm, "BLOCK_D": rd}, rw, None))),
        _Kernel("l2norm_bwd", pl._l2norm_bwd_kernel, {"X": "x", "G": f32, "DX": "x"},
                ("stride_xd",), (), fixed(*(({"PRESCALED": p, "BLOCK_M": rm, "BLOCK_D": rd}, rw, None)
                                            for p in (True, False)))),
        _Kernel("prototype_ce_fwd", pl._prototype_ce_fwd_kernel,
                {"S": f32, "A": "x", "Q": f32, "LSE": f32, "RNORM": f32, "CE_PART": f32, "P_PART": f32},
                ("stride_ad", "stride_qk"), ("inv_tau", "inv_rows"),
                fixed(({"BLOCK_M": km, "BLOCK_K": kk, "BLOCK_D": OUT_DIM}, kw, None))),
        _Kernel("prototype_ce_bwd", pl._prototype_ce_bwd_kernel,
                {n: f32 for n in ("S", "LSE", "RNORM", "Q", "G_CE", "G_MEAN")}, ("stride_qk",), ("scale",),
                fixed(({"BLOCK_M": km, "BLOCK_K": kk}, kw, None))),
    ]  # fmt: skip


def _module(name: str):  # importlib: the package attribute `attention` is the public function, not the module
    return importlib.import_module(f"{__package__}.{name}")


def _jit(obj: Any) -> Any:
    return obj.fn if isinstance(obj, Autotuner) else obj


def build_signature(fn: JITFunction, ptrs: dict[str, str], unit=(), floats=(), constexprs=None):
    """(signature, constexprs, attrs) keyed as triton.compile wants them, for aligned contiguous tensors:
    pointers get a 16-byte alignment hint, unit strides become the constant 1, other strides and HEAD_DIM
    a multiple-of-16 hint, remaining ints plain i32. `ptrs` values are element types ('fp16', 'i64', ...)."""
    constexprs, sig, consts, attrs = dict(constexprs or {}), {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr or name in unit:
            if name not in constexprs and name not in unit:
                raise KeyError(f"{fn.__name__}: no value for constexpr {name}")
            sig[name], consts[(i,)] = "constexpr", constexprs.get(name, 1)
        elif name in ptrs:
            sig[name], attrs[(i,)] = "*" + ptrs[name], [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_") or name == "HEAD_DIM":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _ast_source(fn, sig, consts, attrs):
    """The one API shim: ASTSource takes `constexprs=` since Triton 3.2 (3.6, 3.8, 3.9) and `constants=` before."""
    from triton.compiler import ASTSource

    key = "constexprs" if "constexprs" in inspect.signature(ASTSource.__init__).parameters else "constants"
    return ASTSource(fn, sig, attrs=attrs, **{key: consts})


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, local-memory words) of the cubin's one kernel, from the cuobjdump Triton ships."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) .*LOCAL:(\d+)", out)
    return (int(m.group(1)), int(m.group(2)) // 4) if m else (None, None)


def compile_kernel(fn, sig, consts, attrs, capability: tuple[int, int], num_warps: int = 4, num_stages=None):
    """Compile one specialisation for sm_<capability>; returns (n_regs, n_spills, shared bytes). Raises on error."""
    from triton.backends.compiler import GPUTarget

    if interpreting():  # the interpreter patches tl ops in-process: compile_report uses a child process instead
        raise RuntimeError("compile_kernel cannot run under TRITON_INTERPRET=1")
    cc = capability[0] * 10 + capability[1]
    options = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    compiled = triton.compile(_ast_source(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32), options=options)
    return (*_resources(compiled.asm["cubin"]), compiled.metadata.shared)


def compile_row(row: Row, fn, ptrs, unit, floats, consts, cap: tuple[int, int], warps: int, stages) -> Row:
    """Fill `row` from one compile; any exception becomes an "error: ..." status, so one kernel hides no other."""
    try:
        sig = build_signature(fn, ptrs, unit, floats, consts)
        row.n_regs, row.n_spills, row.shared = compile_kernel(fn, *sig, cap, warps, stages)
        limit = SMEM_LIMIT.get(cap[0] * 10 + cap[1])
        if limit is not None and row.shared > limit:
            row.status = f"over smem ({row.shared} > {limit} B)"
    except Exception as e:
        row.status = "error: " + " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return row


def unavailable() -> str | None:
    """Why nothing can compile here (no CUDA backend or no ptxas in this Triton), or None."""
    from triton.backends import backends

    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no CUDA backend"
    try:
        from triton import knobs

        knobs.nvidia.ptxas.path  # noqa: B018  raises when no ptxas is found
    except Exception as e:  # RuntimeError in 3.6-3.9; an older Triton without knobs lands here too
        return f"no ptxas for triton {triton.__version__} ({type(e).__name__}: {e})"
    return None


def _label(consts: dict, warps: int, stages) -> str:
    shown = [f"{k}={v}" for k, v in consts.items() if k not in ("BLOCK_D", "DOT_PRECISION", "PRECISION", "KDIM")]
    return " ".join(shown + [f"w{warps}"] + ([f"s{stages}"] if stages is not None else []))


def compile_report(targets=TARGETS, head_dims=HEAD_DIMS, dtypes=DTYPES, kernels=None, all_configs=True) -> list[Row]:
    """Rows for every package kernel (or the names in the tuple `kernels`) x config x target x dtype x head
    dim; targets are (major, minor) pairs; all_configs=False keeps each kernel's first config only.

    Under TRITON_INTERPRET the kernels are interpreter objects, so the sweep runs in a child Python without it.
    """
    if not isinstance(_jit(_module("attention_triton")._attention_fwd_kernel), JITFunction):
        return _report_in_subprocess(targets, head_dims, dtypes, kernels, all_configs)
    table = [k for k in _kernels() if kernels is None or k.name in kernels]
    if (reason := unavailable()) is not None:
        return [Row(k.name, "-", "-", "-", None, True, status=f"skipped: {reason}") for k in table]
    rows = []
    for k in table:
        fn = _jit(k.obj)
        sweep_dtypes = dtypes if "x" in k.ptrs.values() else ("fp32",)
        for cap in targets:
            for dtype in sweep_dtypes:
                for d in head_dims if k.attention else (None,):
                    configs = k.configs(dtype, d)
                    for i, (consts, warps, stages) in enumerate(configs if all_configs else configs[:1]):
                        ptrs = {n: dtype if t == "x" else t for n, t in k.ptrs.items()}
                        row = Row(k.name, _label(consts, warps, stages), f"sm_{cap[0]}{cap[1]}", dtype, d, i == 0)
                        rows.append(compile_row(row, fn, ptrs, k.unit, k.floats, consts, cap, warps, stages))
    return rows


def _report_in_subprocess(targets, head_dims, dtypes, kernels, all_configs) -> list[Row]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "msn_fast.kernels.compile_targets", "--json",
           "--targets", ",".join(f"{a}{b}" for a, b in targets), "--head-dims", ",".join(map(str, head_dims)),
           "--dtypes", ",".join(dtypes)] + (["--kernels", ",".join(kernels)] if kernels else [])  # fmt: skip
    cmd += [] if all_configs else ["--default-only"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:  # exit status 1 with JSON rows on stdout just means some row is an error
        return [Row(**r) for r in json.loads(proc.stdout)]
    except ValueError:
        raise RuntimeError(f"compile_targets subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}") from None


def format_table(rows: list[Row]) -> str:
    cols = ("kernel", "config", "target", "dtype", "head_dim", "n_regs", "n_spills", "shared", "status")
    cells = [cols] + [tuple("-" if getattr(r, c) is None else str(getattr(r, c)) for c in cols) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)


def main(argv: list[str] | None = None) -> int:
    """Print the table (or JSON rows with --json); exit status 1 when any kernel fails to compile."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="80,90", help="compute capabilities, e.g. 80,90")
    p.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--kernels", default="", help="comma-separated kernel names (default: all)")
    p.add_argument("--default-only", action="store_true", help="first config of each kernel only")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    caps = tuple((int(t) // 10, int(t) % 10) for t in a.targets.split(","))
    dims, names = tuple(int(d) for d in a.head_dims.split(",")), tuple(a.kernels.split(",")) if a.kernels else None
    rows = compile_report(caps, dims, tuple(a.dtypes.split(",")), names, not a.default_only)
    print(json.dumps([asdict(r) for r in rows]) if a.json else format_table(rows))
    return int(any(r.status.startswith("error") for r in rows))


if __name__ == "__main__":
    sys.exit(main())
