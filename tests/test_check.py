"""`python -m msn_fast.check` on a CPU: the whole command, a kernel broken on purpose, bad arguments, the
roofline formulas and the GPU peak table, the compile section (issue 18)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import msn_fast.kernels.token_gather as token_gather
from msn_fast import check
from msn_fast.flops import gpu_peak_flops, gpu_peaks, step_flops_per_image
from msn_fast.recipes import RECIPES, get_recipe
from msn_fast.roofline import attention_cost, op_cost, prototype_cross_entropy_cost, time_bound
from msn_fast.workloads import CPU_STEP_FLOPS, cpu_step_config

OPS = {"attention", "gather_tokens", "embed_kept_patches", "prototype_cross_entropy"}
FAST = ["--model", "vit_s16", "--no-step", "--no-compile", "--rounds", "1"]


def _cli(*args, timeout=300):
    """The command as a user runs it: no TRITON_INTERPRET (it must re-execute itself) and no test settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MSN_FAST_SELFCHECK", check._CHILD)}
    return subprocess.run([sys.executable, "-m", "msn_fast.check", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_cli_on_a_cpu_reexecutes_under_the_interpreter_and_passes(tmp_path):
    out = tmp_path / "check.json"
    r = _cli("--model", "vit_s16", "--no-compile", "--rounds", "1", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for title in ("== versions", "== kernel checks", "== timings", "== roofline", "== training step"):
        assert title in r.stdout
    assert check.CPU_NOTE in r.stdout
    assert r.stdout.rstrip().splitlines()[-1] == "msn_fast.check: all 11 checks passed"
    report = json.loads(out.read_text())
    assert report["triton_interpret"] is True  # the child ran the Triton paths through the interpreter
    components = {"python", "torch", "CUDA", "GPU", "triton", "DALI", "xformers", "apex", "msn_fast"}
    assert components <= set(report["versions"])
    assert report["versions"]["GPU"]["status"] == "none"
    checks = report["checks"]
    assert {c["op"] for c in checks} == OPS and all(c["ok"] and c["error"] is None for c in checks)
    assert {c["dtype"] for c in checks} == {"bfloat16", "float32"} and len(checks) == 10  # 5 rows per dtype
    assert all(t["torch_s"] > 0 and t["kernel_s"] is None for t in report["timings"])
    assert all(r["flops"] >= 0 and r["bytes"] > 0 and r["bound_s"] is None for r in report["roofline"])
    step = report["step"]
    assert step["ok"] and step["masked"]["mask_ratio"] == 0.15 and step["unmasked"]["mask_ratio"] == 0.0
    assert step["masked"]["images_per_s"] > 0 and step["unmasked"]["images_per_s"] > 0
    assert report["passed"] is True and report["failed"] == [] and report["argv"][:2] == ["--model", "vit_s16"]


def _wrong(*args, **kwargs):
    return token_gather_fwd(*args, **kwargs) * 1.5


def _raises(*args, **kwargs):
    raise RuntimeError("PTX assembly aborted due to errors (planted by the test)")


token_gather_fwd = token_gather.token_gather_fwd


@pytest.mark.parametrize("broken", [None, _wrong, _raises], ids=["intact", "wrong_values", "raises"])
def test_a_broken_kernel_fails_the_check_by_name(monkeypatch, capsys, broken):
    if broken is not None:  # what TokenGatherFunction.forward launches
        monkeypatch.setattr(token_gather, "token_gather_fwd", broken)
    rc = check.main(FAST)
    out = capsys.readouterr().out
    last = out.rstrip().splitlines()[-1]
    if broken is None:
        assert rc == 0 and last == "msn_fast.check: all 10 checks passed", out[-2000:]
        return
    assert rc == 1
    assert last == "msn_fast.check: FAILED: gather_tokens bf16, gather_tokens fp32"  # only the broken op
    note = "RuntimeError: PTX assembly aborted" if broken is _raises else "out: error"
    assert f"gather_tokens fp32: {note}" in out


def test_step_that_raises_is_a_failure(monkeypatch, capsys):
    import msn_fast.step

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (planted)")

    monkeypatch.setattr(msn_fast.step, "train_step", boom)
    rc = check.main(["--model", "vit_s16", "--no-compile", "--rounds", "1"])
    out = capsys.readouterr().out
    assert rc == 1 and out.rstrip().splitlines()[-1] == "msn_fast.check: FAILED: step"
    assert "RuntimeError: CUDA out of memory (planted)" in out


def test_unknown_model_exits_2_with_one_line():
    r = _cli("--model", "vit_nope", timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "msn_fast.check: unknown --model 'vit_nope'; known: " + ", ".join(RECIPES)]


@pytest.mark.parametrize("args", [["--batch", "0"], ["--step-batch", "1"], ["--no-such-flag"]])
def test_bad_flags_exit_2(capsys, args):
    assert check.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("python -m msn_fast.check: error: ")


def test_roofline_attention_formula_and_bound():
    b, h, nq, nkv, d = 8, 16, 308, 308, 64
    c = attention_cost(b, h, nq, nkv, d, elem=2)
    assert c.flops == 3.5 * 4 * b * h * nq * nkv * d  # forward 4·B·H·Nq·Nkv·D, backward 2.5x
    assert c.bytes == 2 * b * h * d * 6 * (nq + nkv) + 16 * b * h * nq
    q = torch.empty(b, h, nq, d, dtype=torch.bfloat16)
    assert op_cost("attention", {"q": q, "k": q, "v": q, "scale": 0.125}) == c
    h200 = gpu_peaks("NVIDIA H200")
    assert time_bound(c, h200) == c.bytes / 4.8e12  # 0.58·N FLOP/B at N = 308: under the H200's ridge (206)
    long = attention_cost(b, h, 1025, 1025, d, elem=2)
    assert time_bound(long, h200) == long.flops / 989e12  # ViT-L/7's 1025 tokens: compute-bound
    assert time_bound(c, None) is None
    loss = prototype_cross_entropy_cost(m=11 * 64, b=64, k=1024, d=256, elem=2)
    assert loss.flops == 6 * 11 * 64 * 1024 * 256  # the op's one logit matmul and its two gradient matmuls
    # bf16 anchors read twice and d anchor written; fp32 prototypes read twice and d prototypes written; fp32
    # targets read twice; the CE and the mean prediction written
    assert loss.bytes == 3 * 2 * 11 * 64 * 256 + 3 * 4 * 1024 * 256 + 2 * 4 * 64 * 1024 + 4 * (1 + 1024)
    assert time_bound(loss, h200) == max(loss.flops / 989e12, loss.bytes / 4.8e12)


def test_gpu_peaks_by_device_name():
    assert gpu_peaks("NVIDIA H200") == (989e12, 4.8e12)
    assert gpu_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert gpu_peaks("NVIDIA A100-SXM4-80GB") == (312e12, 2.0e12)  # not the A10's
    assert gpu_peaks("NVIDIA A10") == (125e12, 0.6e12)
    assert gpu_peaks("Tesla T4") is None
    assert gpu_peak_flops(torch.device("cpu")) is None


def test_cpu_step_is_shrunk_to_its_budget():
    cfg = get_recipe("vit_l7")
    changed = cpu_step_config(cfg)
    assert 2 * step_flops_per_image(cfg) <= CPU_STEP_FLOPS
    assert cfg.vit.dim == 1024 and cfg.vit.patch_size == 7 and cfg.data.global_size % 7 == 0  # width, patch kept
    assert "--vit.depth=2 (recipe 24)" in changed and "--data.num_focal=2 (recipe 10)" in changed


def test_compile_section_compiles_a_kernel_for_both_targets():
    c = check.compile_section(get_recipe("vit_s16"), compile_all=False, kernels=("token_gather_fwd",))
    rows = c["rows"]
    assert [(r["kernel"], r["target"], r["dtype"]) for r in rows] == [
        ("token_gather_fwd", "sm_80", "bf16"), ("token_gather_fwd", "sm_90", "bf16")]
    assert all(r["status"] == "ok" and r["n_regs"] for r in rows) and c["failed"] == []
    assert "token_gather_fwd" in c["table"] and c["seconds"] > 0


def test_compile_errors_and_default_spills_fail(monkeypatch, capsys):
    from msn_fast.kernels import compile_targets as ct

    def report(targets, head_dims, dtypes, kernels, all_configs):
        assert all_configs is False and head_dims == (64,) and dtypes == ("bf16",)
        return [ct.Row("attention_fwd", "BLOCK_M=64", "sm_90", "bf16", 64, True, 128, 0, 1024),
                ct.Row("attention_bwd_dq", "BLOCK_M2=64", "sm_90", "bf16", 64, True, 255, 12, 1024),
                ct.Row("attention_bwd_dq", "BLOCK_M2=128", "sm_90", "bf16", 64, False, 255, 40, 1024),  # tuned away
                ct.Row("l2norm_fwd", "BLOCK_M=8", "sm_80", "fp32", None, False, status="error: PTXASError: boom")]

    monkeypatch.setattr(ct, "compile_report", report)
    rc = check.main(["--model", "vit_s16", "--no-step", "--rounds", "1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert out.rstrip().splitlines()[-1] == ("msn_fast.check: FAILED: compile attention_bwd_dq sm_90 bf16, "
                                             "compile l2norm_fwd sm_80 fp32")
