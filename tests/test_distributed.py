"""Training at scale on CPU: FSDP2 over 2 gloo processes, checkpoints across process counts, signals, NaNs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from msn_fast.checkpoint import load_meta, load_model

TINY = ["--vit.dim", "32", "--vit.depth", "2", "--vit.heads", "2", "--head.hidden_dim", "64", "--head.out_dim",
        "32", "--head.num_prototypes", "32", "--data.num_workers", "0", "--data.global_size", "16",
        "--data.focal_size", "8", "--data.num_focal", "2", "--vit.img_size", "16", "--run.log_every", "1",
        "--run.eval_lowshot", "false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(args, nproc=1, timeout=600):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "msn_fast.train", *args]
    else:
        cmd = [sys.executable, "-m", "msn_fast.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.mark.slow
def test_two_process_fsdp_bf16_matches_one_process_and_reshards(tmp_path):
    """2 processes x batch 8 (FSDP2, bf16 params, sync BN, all-reduced ME-MAX) vs 1 process x batch 16 (FSDP2, bf16).

    Mask ratio 0 so both runs see identical inputs (masks are drawn per process). Then the 2-rank checkpoint
    resumes in 1 process."""
    # The official EMA start (0.996). With the demo recipe's 0.9 the target takes 25x more of each student
    # step, and its sharpened softmax (T 0.025) amplifies the bf16 rounding differences of the first Adam
    # steps: the losses then differ by 2.4% already at step 2 (measured), which is not what this test checks.
    common = TINY + ["--mask.ratio", "0", "--dist.param_dtype", "bf16", "--optim.epochs", "1",
                     "--run.max_steps", "4", "--loss.sinkhorn_iters", "3", "--optim.ema_start", "0.996"]
    two, one = tmp_path / "two", tmp_path / "one"
    r2 = _run(common + ["--data.batch_size", "8", "--run.out_dir", str(two)], nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = _run(common + ["--data.batch_size", "16", "--run.out_dir", str(one)])
    assert r1.returncode == 0, r1.stderr[-3000:]
    a, b = _losses(two), _losses(one)
    assert len(a) == len(b) == 4
    np.testing.assert_allclose(a, b, rtol=2e-2, err_msg=f"2 processes {a} vs 1 process {b}")
    assert abs(a[-1] - a[0]) > 1e-3  # the runs actually trained
    # the checkpoint written by 2 ranks loads in 1 process and training continues
    r = _run(common + ["--data.batch_size", "16", "--run.out_dir", str(two), "--run.resume", "true",
                       "--run.max_steps", "6"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and load_meta(two)["step"] == 6
    model, _ = load_model(two)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--data.batch_size", "8", "--run.checkpoint_every", "2", "--run.max_steps", "6", "--run.out_dir",
                   str(out)]
    script = (
        "import os, signal, sys, torch.distributed.checkpoint as dcp\n"
        "calls = []\n"
        "real = dcp.save\n"
        "def dying_save(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        real(*a, **k)\n"  # the shards are written, the pointer is not yet
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "dcp.save = dying_save\n"
        "from msn_fast.train import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (out / "checkpoints" / ".partial_step_0000004").is_dir()  # the half-written one exists on disk...
    assert not (out / "checkpoints" / "step_0000004").exists()  # ...but never under a step's name
    assert load_meta(out)["step"] == 2  # ...but `latest` still names the complete one
    load_model(out)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--data.batch_size", "8", "--optim.epochs", "50", "--run.out_dir", str(out)]
    p = subprocess.Popen([sys.executable, "-m", "msn_fast.train", *args], stderr=subprocess.PIPE, text=True, env=ENV)
    lines = []
    for line in p.stderr:
        lines.append(line)
        if "step 2/" in line:
            p.send_signal(signal.SIGTERM)
            break
    rest = p.communicate(timeout=300)[1]
    assert p.returncode == 128 + signal.SIGTERM, "".join(lines) + rest  # 143, as a shell reports SIGTERM
    assert "stopped by SIGTERM" in rest
    assert load_meta(out)["step"] >= 2


@pytest.mark.slow
def test_vit_l7_starts_on_cpu_and_stops_on_ctrl_c(tmp_path):
    """The real ViT-L/7 recipe starts on a CPU, reports its size, and stops cleanly on SIGINT."""
    out = tmp_path / "l7"
    p = subprocess.Popen([sys.executable, "-m", "msn_fast.train", "--model", "vit_l7", "--data.batch_size", "2",
                          "--data.num_workers", "0", "--run.out_dir", str(out)], stderr=subprocess.PIPE, text=True,
                         env=ENV)
    lines = []
    for line in p.stderr:
        lines.append(line)
        if "steps/epoch" in line:  # the trainer's data line, after the model is built (not build_sources')
            time.sleep(1.0)
            p.send_signal(signal.SIGINT)
            break
    rest = p.communicate(timeout=600)[1]
    text = "".join(lines) + rest
    assert p.returncode == 130, text
    assert "model vit_l7: 303." in text  # ViT-L/7 trunk: ~303M parameters
    assert "stopped by SIGINT" in text and "Traceback" not in text


def test_nan_losses_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch, capsys):
    from msn_fast import model as model_mod
    from msn_fast.train import main

    real = model_mod.MSN.loss
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        loss, stats = real(self, *a, **k)
        bad = calls["n"] in (2,) or calls["n"] >= 5
        return (loss * float("nan"), stats) if bad else (loss, stats)

    monkeypatch.setattr(model_mod.MSN, "loss", flaky)
    out = tmp_path / "run"
    rc = main(TINY + ["--data.batch_size", "8", "--run.max_bad_steps", "3", "--run.checkpoint_every", "3",
                      "--run.out_dir", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "3 consecutive non-finite losses" in err and "last good checkpoint" in err
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 3, 4]
    assert recs[-1]["skipped_steps"] == 1
    assert load_meta(out)["step"] == 3  # the last checkpoint before the bad streak is intact


def test_corrupted_checkpoint_shard_is_a_clear_error(tmp_path, capsys):
    from msn_fast.train import main

    out = tmp_path / "run"
    args = TINY + ["--data.batch_size", "8", "--run.max_steps", "2", "--run.out_dir", str(out)]
    assert main(args) == 0
    step_dir = out / "checkpoints" / "step_0000002"
    shard = next(step_dir.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # truncated, as by a full disk
    capsys.readouterr()
    assert main(args + ["--run.resume", "true", "--run.max_steps", "3"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: checkpoint ") and "could not be loaded" in errors[0], errors


def test_ctrl_c_to_the_process_group_with_loader_workers_saves(tmp_path):
    """A terminal's Ctrl-C reaches the DataLoader workers too; they ignore it, so the step finishes and is saved."""
    out = tmp_path / "run"
    args = TINY + ["--data.batch_size", "8", "--data.num_workers", "1", "--optim.epochs", "50", "--run.out_dir",
                   str(out)]
    p = subprocess.Popen([sys.executable, "-m", "msn_fast.train", *args], stderr=subprocess.PIPE, text=True, env=ENV,
                         start_new_session=True)
    lines = []
    for line in p.stderr:
        lines.append(line)
        if "step 2/" in line:
            os.killpg(p.pid, signal.SIGINT)
            break
    rest = p.communicate(timeout=300)[1]
    assert p.returncode == 130, "".join(lines) + rest
    assert "stopped by SIGINT" in rest and "Traceback" not in rest, rest
    assert load_meta(out)["step"] >= 2


_STEP_WORKER = r"""
import os, sys
import torch
import torch.distributed as dist
import msn_fast.model as msn_model
from msn_fast.dataloading.loader import MultiViewBatch
from msn_fast.config import Config, DistConfig, HeadConfig, LossConfig, MaskConfig, OptimConfig, ViTConfig
from msn_fast.distributed import init_distributed
from msn_fast.build import build_model, build_optimizer
from msn_fast.schedules import Schedules
from msn_fast.step import read_step, train_step

out, stem, hide = sys.argv[1], sys.argv[2].removesuffix("_hide"), sys.argv[2].endswith("_hide")
fsdp = sys.argv[3]  # "auto": FSDP2 with 2 processes; "off": replicated parameters, gradients all-reduced
info = init_distributed("cpu")
cfg = Config(vit=ViTConfig(dim=32, depth=2, heads=2, patch_size=4, img_size=16, attn_impl="torch",
                           embed_impl="torch", stem=stem, stem_hides_dropped=hide),
             head=HeadConfig(hidden_dim=64, out_dim=32, num_prototypes=32),
             mask=MaskConfig(ratio=0.5, mode="per_sample"), loss=LossConfig(sinkhorn_iters=3),
             optim=OptimConfig(epochs=1, warmup_epochs=0), dist=DistConfig(fsdp=fsdp))
torch.manual_seed(0)  # the same initial model on every process
model = build_model(cfg, torch.device("cpu"), info)
g = torch.Generator().manual_seed(1)  # the same global batch and masks everywhere; each rank takes its rows
B = 16
globals_ = torch.randn(2, B, 3, 16, 16, generator=g)
focals = torch.randn(3, B, 3, 8, 8, generator=g)
table = torch.rand(B, 16, generator=g).argsort(dim=1)[:, :8]  # per-sample kept patches, 50% masked
b = B // info.world
rows = slice(info.rank * b, (info.rank + 1) * b)
msn_model.sample_keep_indices = lambda batch, n, ratio, mode, device=None: table[rows][:batch].to(device)
batch = MultiViewBatch(globals_[:, rows].contiguous(), focals[:, rows].contiguous(), torch.full((b,), -1))
optimizer = build_optimizer(cfg, model, torch.device("cpu"))
m = train_step(model, batch, optimizer, Schedules(cfg.optim, 10, 10), 0, cfg)
full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
ok, terms, _ = read_step(m, torch.zeros(3, dtype=torch.int64))  # the global batch's loss, as logged
assert ok
res = {"loss": torch.tensor(terms[0]), "me_max": torch.tensor(terms[2])}
for name, p in model.student.named_parameters():
    res["grad." + name] = full(p.grad).detach().clone()
res["grad.prototypes"] = model.prototypes.grad.clone()
for name, buf in model.student.named_buffers():
    if "running" in name:
        res["buffer." + name] = buf.clone()
assert any(hasattr(p, "full_tensor") for p in model.student.parameters()) == (fsdp == "auto" and info.world > 1)
torch.save(res, os.path.join(out, f"world{info.world}_rank{info.rank}.pt"))
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("stem, fsdp", [("linear", "auto"), ("conv", "auto"), ("conv_hide", "auto"), ("conv", "off")])
def test_two_process_step_matches_one_process_with_masking_and_sync_bn(tmp_path, stem, fsdp):
    """One training step (the product's train_step) of 2 gloo processes x 8 images vs 1 process x 16,
    fp32, 50% per-sample masking (the same masks, taken by sample), SyncBN in the head (and in the conv
    stem: SyncBatchNorm2d; `conv_hide`: with vit.stem_hides_dropped, each rank zeroing its own samples' dropped
    patches), FSDP2 on the two ranks (`fsdp` off: each rank holds the whole model and the step averages every
    gradient in one all-reduce; the two ranks' gradients must then be equal), Sinkhorn and ME-MAX across ranks.
    Gradients (after clipping), BN running statistics and the logged loss agree up to fp32 rounding of another summation
    order; a sum where a mean belongs (2x), a missing all-reduce (half the batch) or local BN statistics are
    O(1) off. (The parameters after the first AdamW step are not compared: that step is ~lr·sign(g), which
    turns a rounding difference in a near-zero gradient into an O(lr) one.)"""
    (tmp_path / "w").write_text(_STEP_WORKER)
    env = {**ENV, "PYTHONPATH": os.pathsep.join(sys.path)}
    one = subprocess.run([sys.executable, str(tmp_path / "w"), str(tmp_path), stem, fsdp], capture_output=True,
                         text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "w"), str(tmp_path), stem, fsdp], capture_output=True, text=True, timeout=300,
                         env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    b = torch.load(tmp_path / "world1_rank0.pt")
    a = [torch.load(tmp_path / f"world2_rank{rank}.pt") for rank in (0, 1)]
    _compare_step(a[0], b, stem)
    if fsdp == "off":  # the replicas step with the same gradients (a + b is b + a), so they stay identical
        for key in a[0]:
            if key.startswith("grad."):
                assert torch.equal(a[0][key], a[1][key]), f"{key}: the two replicas' gradients differ"


def _compare_step(a: dict, b: dict, stem: str) -> None:
    from conftest import rounding_bound

    assert a.keys() == b.keys() and any(k.startswith("buffer.head") for k in a)
    assert stem.startswith("conv") == any(k.startswith("buffer.trunk.patch_embed") for k in a)
    # Sums over up to 16 images x 17 tokens x 64 features, a few chained: conftest's rounding model.
    # Normwise over the encoder's gradient: some entries are zero in exact arithmetic (the trunk's
    # final LayerNorm bias feeds a BatchNorm, which removes any shift) and are rounding noise.
    bound = rounding_bound(torch.float32, 16 * 17 * 64)
    grad_scale = max(v.abs().max().item() for k, v in b.items() if k.startswith("grad.") and k != "grad.prototypes")
    for key in a:
        scale = grad_scale if key.startswith("grad.") and key != "grad.prototypes" else b[key].abs().max().item()
        err = (a[key] - b[key]).abs().max().item()
        assert err <= bound * scale, f"{key}: 2 processes differ from 1 by {err:.3e} (scale {scale:.3e})"
    assert b["grad.prototypes"].abs().max() > 0 and b["me_max"] > 0
