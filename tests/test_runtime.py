"""Runtime options of the trainer: activation checkpointing, compile, FLOP counts, batch fitting, CPU threads."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from msn_fast.cli import apply_overrides
from msn_fast.distributed import DistInfo
from msn_fast.recipes import get_recipe
from msn_fast.runtime import (
    build_model,
    cpu_training_threads,
    step_flops_per_image,
    tokens_per_image,
    usable_cores,
)

TINY = ["--vit.dim", "32", "--vit.depth", "3", "--vit.heads", "2", "--head.hidden_dim", "64", "--head.out_dim",
        "32", "--head.num_prototypes", "32", "--data.global_size", "16", "--data.focal_size", "8",
        "--data.num_focal", "2", "--vit.img_size", "16", "--data.batch_size", "4"]


def saved_bytes(fn) -> int:
    """Bytes of distinct storages saved for backward while running fn (parameters excluded)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    seen, total = set(), 0

    def pack(t):
        nonlocal total
        if isinstance(t, torch.nn.Parameter):
            return t
        ref = StorageWeakRef(t.untyped_storage())
        if ref.cdata not in seen:
            seen.add(ref.cdata)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _loss_and_grads(cfg):
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"), DistInfo())
    g, f = torch.randn(2, 4, 3, 16, 16), torch.randn(2, 4, 3, 8, 8)
    out = {}

    def run():
        torch.manual_seed(1)  # same mask in both models
        out["loss"], _ = model.loss(g, f)

    nbytes = saved_bytes(run)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.student.named_parameters()}
    grads["prototypes"] = model.prototypes.grad.clone()
    return out["loss"].detach(), grads, nbytes


def test_activation_checkpointing_saves_less_and_gives_the_same_gradients():
    plain = apply_overrides(get_recipe("vit_tiny"), TINY)
    ac = apply_overrides(get_recipe("vit_tiny"), TINY + ["--dist.activation_checkpointing", "true"])
    l0, g0, b0 = _loss_and_grads(plain)
    l1, g1, b1 = _loss_and_grads(ac)
    torch.testing.assert_close(l1, l0)
    assert b1 < 0.6 * b0, (b0, b1)
    names1 = {n.replace("_checkpoint_wrapped_module.", ""): v for n, v in g1.items()}
    assert set(names1) == set(g0)
    for n, g in g0.items():
        torch.testing.assert_close(names1[n], g, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    cfg = apply_overrides(get_recipe("vit_tiny"), TINY + ["--vit.depth", "1"])
    l0, g0, _ = _loss_and_grads(cfg)
    cfg_c = apply_overrides(get_recipe("vit_tiny"), TINY + ["--vit.depth", "1", "--dist.compile", "true"])
    l1, g1, _ = _loss_and_grads(cfg_c)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    g1 = {n.replace("_orig_mod.", ""): v for n, v in g1.items()}
    # Some gradients are exactly zero in exact arithmetic (the final LN bias feeds a BatchNorm, which removes
    # constant shifts), so compare against the scale of all gradients rather than elementwise-relatively.
    scale = max(g.abs().max().item() for g in g0.values())
    for n, g in g0.items():
        err = (g1[n] - g).abs().max().item()
        assert err < 1e-4 * scale, f"{n}: max gradient difference {err:.2e} (scale {scale:.2e})"


def test_closed_form_flops_match_flop_counter():
    cfg = apply_overrides(get_recipe("vit_tiny"), TINY + ["--mask.ratio", "0.5", "--head.hidden_dim", "8",
                                                          "--head.out_dim", "8", "--head.num_prototypes", "8"])
    model = build_model(cfg, torch.device("cpu"), DistInfo())
    g, f = torch.randn(2, 4, 3, 16, 16), torch.randn(2, 4, 3, 8, 8)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.loss(g, f)
        loss.backward()
    counted = counter.get_total_flops() / 4
    estimate = step_flops_per_image(cfg)
    assert 0.8 * counted < estimate < 1.05 * counted, (estimate, counted)  # the estimate leaves out embed + head


def test_official_l7_token_budget():
    t, a, f = tokens_per_image(get_recipe("vit_l7"))
    assert (t, a, f) == (1025, 308, 10 * 170)


def test_cpu_training_threads_leave_cores_to_loader_workers(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    no_quota = tmp_path / "absent"
    assert cpu_training_threads(0, no_quota) == 8
    assert cpu_training_threads(3, no_quota) == 5
    assert cpu_training_threads(20, no_quota) == 1  # never fewer than one
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")  # cgroup v2, no limit
    assert cpu_training_threads(1, quota) == 7
    quota.write_text("250000 100000\n")  # a container limited to 2.5 CPUs
    assert usable_cores(quota) == 3 and cpu_training_threads(1, quota) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine share its cores
    assert cpu_training_threads(1, no_quota) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # the user's choice is left alone
    assert cpu_training_threads(1, no_quota) is None
