"""`python -m msn_fast.check [--model vit_s16]`: what works on this machine, in about a minute (issue 18).

Sections, one table each: versions; each Triton kernel against its torch reference at the recipe's real
shapes (`msn_fast.kernels.selfcheck.check_op`: forward and backward, bf16 and fp32, the tests' tolerance);
kernel vs torch fwd+bwd timings; a roofline bound per kernel row (msn_fast/roofline.py); a full training step,
masked vs unmasked (img/s, MFU, peak memory); the sm_80/sm_90 compile table (msn_fast.kernels.compile_targets).
Exit status 0 when every check passes, 1 when one fails, 2 for bad arguments. A report, so it prints.
Without CUDA the kernels run under the Triton interpreter at tiny shapes (the command re-executes itself with
TRITON_INTERPRET=1, which must be set before msn_fast.kernels is imported) and only the torch paths are timed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from . import __version__
from .config import Config
from .flops import gpu_peaks
from .recipes import RECIPES, get_recipe
from .roofline import bound_applies, op_cost, time_bound
from .workloads import cpu_step_config, fwd_bwd, kernel_cases, median_time, step_section, tiny

CPU_NOTE = "CPU: Triton interpreter at tiny shapes; timings are of the torch paths"
_CHILD = "MSN_FAST_CHECK_CHILD"  # set in the re-executed process, so it never re-executes again
_DT = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m msn_fast.check", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_s16", help="recipe whose shapes are checked (msn_fast/recipes.py)")
    p.add_argument("--batch", type=int, default=None, help="images per kernel check (default 8 on a GPU, 2 on a CPU)")
    p.add_argument("--step-batch", type=int, default=None,
                   help="images per training step (default: the recipe's data.batch_size on a GPU, 2 on a CPU)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds, median reported (default 10 GPU, 3 CPU)")
    p.add_argument("--out", default=None, help="write everything to this JSON file")
    p.add_argument("--no-step", action="store_true", help="skip the training step")
    p.add_argument("--no-compile", action="store_true", help="skip the compile table")
    p.add_argument("--compile-all", action="store_true",
                   help="compile every autotune config, head dim and dtype (default: first configs, this recipe)")
    a = p.parse_args(argv)
    for name in ("batch", "step_batch", "rounds"):
        if getattr(a, name) is not None and getattr(a, name) < (2 if name == "step_batch" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'step_batch' else 1}")
    return a


# ---- 1. versions ----------------------------------------------------------------------------------------


def _package(module: str, dist: str) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(module)
    except ModuleNotFoundError:
        return {"status": "not installed", "version": None}
    except Exception as e:  # installed but broken (a CUDA mismatch, a missing library)
        return {"status": "broken", "version": None, "error": f"{type(e).__name__}: {e}"[:200]}
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
    return {"status": "available", "version": str(version)}


def versions() -> dict[str, dict]:
    out = {"python": {"status": "available", "version": platform.python_version()},
           "torch": {"status": "available", "version": torch.__version__},
           "CUDA": {"status": "torch build" if torch.version.cuda else "none", "version": torch.version.cuda}}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpus = f" (x{torch.cuda.device_count()})" if torch.cuda.device_count() > 1 else ""
        out["GPU"] = {"status": "available", "version": f"{p.name}{gpus}, sm_{p.major}{p.minor}, "
                                                        f"{p.total_memory / 2**30:.0f} GiB"}
    else:
        out["GPU"] = {"status": "none", "version": None}
    optional = (("triton", "triton", "triton"), ("DALI", "nvidia.dali", "nvidia-dali-cuda120"),
                ("xformers", "xformers", "xformers"), ("apex", "apex", "apex"))
    for label, module, dist in optional:
        out[label] = _package(module, dist)
    out["msn_fast"] = {"status": "available", "version": __version__}
    return out


# ---- 2, 3, 5. kernel checks, timings, rooflines ----------------------------------------------------------


def kernel_section(cfg: Config, batch: int, device: torch.device, dtypes, rounds: int, peaks, interpreter: bool):
    """Check, time and bound every case at every dtype; returns (checks, timings, roofline) row lists.
    Under the interpreter only the torch path is timed; the kernel is timed only when its check passed."""
    from msn_fast.kernels.selfcheck import check_op

    checks, timings, roof = [], [], []
    for dtype in dtypes:
        for case in kernel_cases(cfg, batch, device, dtype):
            name = f"{case.name} {_DT[dtype]}"
            res = asdict(check_op(case.op, **case.kwargs))
            checks.append({"name": name, **res})
            t = {"name": name, "torch_s": None, "kernel_s": None, "ratio": None, "error": None}
            try:
                t["torch_s"] = median_time(fwd_bwd(case.op, case.kwargs, "torch"), rounds, device)
                if not interpreter and res["ok"]:
                    t["kernel_s"] = median_time(fwd_bwd(case.op, case.kwargs, "triton"), rounds, device)
                    t["ratio"] = t["torch_s"] / t["kernel_s"]
            except Exception as e:  # an OOM, a launch failure the check did not meet
                t["error"] = f"{type(e).__name__}: {e}"[:300]
            timings.append(t)
            cost = op_cost(case.op, case.kwargs)
            bound = time_bound(cost, peaks) if bound_applies(dtype) else None
            frac = bound / t["kernel_s"] if bound is not None and t["kernel_s"] else None
            roof.append({"name": name, "flops": cost.flops, "bytes": cost.bytes, "bound_s": bound, "fraction": frac})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return checks, timings, roof


def _worst(c: dict) -> str:
    ratios = [c["max_err"][k] / c["bound"][k] for k in c["max_err"] if c["bound"].get(k)]
    return f"{max(ratios):.3f}" if ratios else "-"


def report_kernels(ctx: dict, checks: list[dict], timings: list[dict], roof: list[dict]) -> list[str]:
    """Print the three kernel tables; returns the names of the failing rows."""
    cpu, peaks, name = ctx["device"] == "cpu", ctx["peaks"], ctx["device"]
    _show(f"kernel checks ({ctx['model']} shapes, batch {ctx['batch']}): Triton vs torch reference, fwd+bwd",
          ("kernel", "shapes", "result", "worst err/bound", "s"),
          [(c["name"], c["shapes"], "ok" if c["ok"] else "FAIL", _worst(c), f"{c['seconds']:.2f}") for c in checks],
          [f"{c['name']}: {c['error']}" for c in checks if c["error"]] + ([CPU_NOTE] if cpu else []))
    _show(f"timings: fwd+bwd, median of {ctx['rounds']} (ms)", ("kernel", "torch", "kernel", "torch/kernel"),
          [(t["name"], _ms(t["torch_s"]), "interpreter" if cpu else _ms(t["kernel_s"]),
            "-" if t["ratio"] is None else f"{t['ratio']:.2f}") for t in timings],
          [f"{t['name']}: {t['error']}" for t in timings if t["error"]])
    note = (f"bounds at {name}'s dense bf16 peak, {peaks[0] / 1e12:.0f} TFLOP/s and {peaks[1] / 1e12:.2f} TB/s; "
            "16-bit rows only" if peaks else f"no bounds: {'no GPU' if cpu else 'no peak table entry for ' + name}")
    _show("roofline: fwd+bwd", ("kernel", "GFLOP", "MB", "bound ms", "of bound"),
          [(r["name"], f"{r['flops'] / 1e9:.4f}", f"{r['bytes'] / 1e6:.3f}", _ms(r["bound_s"]),
            "-" if r["fraction"] is None else f"{100 * r['fraction']:.0f}%") for r in roof], [note])
    failed = [c["name"] for c in checks if not c["ok"]]
    return failed + [t["name"] for t in timings if t["error"] and t["name"] not in failed]


# ---- 4. the training step -----------------------------------------------------------------------------------


def report_step(ctx: dict, s: dict) -> None:
    rows = [(k, s[k]["mask_ratio"], f"{s[k]['images_per_s']:.1f}", _ms(s[k]["median_s"]),
             "n/a" if s[k]["mfu"] is None else f"{100 * s[k]['mfu']:.1f}%",
             "n/a" if s[k]["peak_memory_bytes"] is None else f"{s[k]['peak_memory_bytes'] / 2**30:.2f}")
            for k in ("masked", "unmasked") if k in s]
    end = f"masking speed-up: x{s['speedup']:.2f} (unmasked / masked time)" if s["ok"] else f"FAILED: {s['error']}"
    _show(f"training step ({ctx['model']}, batch {s['batch']}, median of {s['rounds']})",
          ("step", "mask", "img/s", "ms", "MFU", "peak GiB"), rows, s["notes"] + [end])


# ---- 6. the compile table ---------------------------------------------------------------------------------


def compile_section(cfg: Config, compile_all: bool, kernels: tuple[str, ...] | None = None) -> dict:
    """compile_targets.compile_report of `kernels` (default all). By default each kernel's first config at
    this recipe's head dim: bf16 and fp32 for this GPU's target, or bf16 for sm_80 and sm_90 without a GPU
    (about 25 compiles, 30 s with an empty Triton cache on 2 cores). --compile-all: every config, head dim and
    dtype for sm_80, sm_90 and this GPU. A compile error anywhere, or a spill or a shared-memory overflow in
    a default config, is a failure."""
    from msn_fast.kernels import compile_targets as ct

    hd = cfg.vit.dim // cfg.vit.heads
    gpu = torch.cuda.is_available()
    targets = (torch.cuda.get_device_capability(0),) if gpu else ct.TARGETS
    if compile_all:
        targets, dims, dtypes = tuple(dict.fromkeys(ct.TARGETS + targets)), ct.HEAD_DIMS, ct.DTYPES
    else:
        dims, dtypes = ((hd,) if hd in ct.HEAD_DIMS else ct.HEAD_DIMS), (("bf16", "fp32") if gpu else ("bf16",))
    t0 = time.perf_counter()
    rows = ct.compile_report(targets, dims, dtypes, kernels, all_configs=compile_all)
    failed = [r for r in rows if r.status.startswith("error")
              or (r.default and ((r.n_spills or 0) > 0 or r.status.startswith("over smem")))]
    return {"seconds": time.perf_counter() - t0, "table": ct.format_table(rows), "rows": [asdict(r) for r in rows],
            "failed": sorted({f"compile {r.kernel} {r.target} {r.dtype}" for r in failed})}


# ---- 7. output --------------------------------------------------------------------------------------------


def table(title: str, header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [header] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return f"\n== {title}\n" + "\n".join(lines)


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.3f}"


def _show(title: str, header: tuple[str, ...], rows: list[tuple], notes: list[str] = ()) -> None:
    print(table(title, header, rows) + "".join(f"\n  {n}" for n in notes), flush=True)


def _interpret(argv: list[str]) -> int:
    """Run this command again with TRITON_INTERPRET=1 (read by Triton when msn_fast.kernels is imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", _CHILD: "1"}
    return subprocess.call([sys.executable, "-m", "msn_fast.check", *argv], env=env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its usage line already printed)
        return int(e.code or 0)
    try:
        recipe = get_recipe(args.model)
    except ValueError:
        print(f"msn_fast.check: unknown --model {args.model!r}; known: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    from msn_fast.kernels._utils import triton_available

    cuda, triton_ok = torch.cuda.is_available(), triton_available()
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not cuda and triton_ok and not interpreting and not os.environ.get(_CHILD):
        return _interpret(argv)
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    ctx = {"model": args.model, "device": name, "peaks": gpu_peaks(name) if cuda else None,
           "rounds": args.rounds or (10 if cuda else 3), "batch": args.batch or (8 if cuda else 2)}
    report = {"command": " ".join(["python -m msn_fast.check", *argv]), "argv": argv, **ctx,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "triton_interpret": interpreting, "notes": [] if cuda else [CPU_NOTE]}
    failed, passed = [], 0
    if not cuda:
        print(CPU_NOTE, flush=True)

    report["versions"] = v = versions()
    _show("versions", ("component", "status", "version"),
          [(k, e["status"], e.get("version") or e.get("error") or "-") for k, e in v.items()])

    if triton_ok:
        shapes = recipe if cuda else tiny(recipe)
        rows = kernel_section(shapes, ctx["batch"], device, (torch.bfloat16, torch.float32), ctx["rounds"],
                              ctx["peaks"], interpreter=not cuda)
        report.update(zip(("checks", "timings", "roofline"), rows))
        bad = report_kernels(ctx, *rows)
        failed, passed = failed + bad, passed + len(rows[0]) - len(bad)
    else:
        report["notes"].append("triton not installed: kernel checks and compile table skipped")
        print(f"\n{report['notes'][-1]}", flush=True)

    if not args.no_step:
        step_cfg, notes = copy.deepcopy(recipe), []
        if not cuda:
            notes = ["CPU: fp32, " + (", ".join(cpu_step_config(step_cfg)) or "the recipe's shapes")]
        b = args.step_batch or (step_cfg.data.batch_size if cuda else 2)
        peak = ctx["peaks"][0] if ctx["peaks"] else None
        report["step"] = s = {**step_section(step_cfg, device, b, min(ctx["rounds"], 5) if cuda else 2, peak),
                              "notes": notes}
        report_step(ctx, s)
        failed, passed = failed + ([] if s["ok"] else ["step"]), passed + s["ok"]
        from msn_fast.kernels import selfcheck  # the first-use checks the step's backend="auto" calls ran

        done = selfcheck.results()
        s["selfcheck"] = {"shape_classes": len(done), "seconds": sum(r.seconds for r in done),
                          "failed": [f"{r.op} {r.dtype} {r.shapes}" for r in done if not r.ok]}
        if done:
            print(f"  kernel self-checks on first use: {len(done)} shape classes in "
                  f"{s['selfcheck']['seconds']:.2f} s, once per process", flush=True)
        failed += [f"self-check of {r.op}" for r in done if not r.ok]

    if not args.no_compile and triton_ok:
        try:
            c = compile_section(recipe, args.compile_all)
        except Exception as e:  # the report's own child process failed
            c = {"seconds": None, "table": f"compile report failed: {type(e).__name__}: {e}"[:500], "rows": [],
                 "failed": ["compile"]}
        report["compile"] = {k: c[k] for k in ("seconds", "rows", "failed")}
        failed, passed = failed + c["failed"], passed + (not c["failed"])
        took = "" if c["seconds"] is None else f", {len(c['rows'])} compiles in {c['seconds']:.0f} s"
        which = "all" if args.compile_all else "default"
        print(f"\n== compile table ({which} configs{took})\n{c['table']}", flush=True)

    report.update(failed=failed, passed=not failed)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    end = f"FAILED: {', '.join(failed)}" if failed else f"all {passed} checks passed"
    print(f"\nmsn_fast.check: {end}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
