"""What a CPU run uses (msn_fast/cpu_resources.py): training threads that leave cores to the loader workers, and a
batch fitted to the RAM, which config.json then records."""

import json

from msn_fast.cpu_resources import cpu_training_threads, usable_cores


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


def test_config_json_records_the_batch_fitted_to_memory(tmp_path, monkeypatch, capfd):
    """A batch lowered to fit the RAM is the batch config.json (and the checkpoint's config) says the run used."""
    import os

    from msn_fast.checkpoint import load_meta
    from msn_fast.train import main

    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name in ("SC_PAGE_SIZE", "SC_PHYS_PAGES") else real(name))
    out = tmp_path / "run"
    rc = main(["--model", "cpu_demo", "--vit.dim", "32", "--vit.depth", "2", "--vit.heads", "2", "--head.hidden_dim",
               "64", "--head.out_dim", "32", "--head.num_prototypes", "32", "--data.batch_size", "32",
               "--data.num_workers", "0", "--data.global_size", "16", "--data.focal_size", "8", "--data.num_focal",
               "2", "--vit.img_size", "16", "--run.max_steps", "2", "--run.eval_lowshot", "false",
               "--run.out_dir", str(out)])
    monkeypatch.undo()
    assert rc == 0
    assert "batch 32 needs" in capfd.readouterr().err  # the fit happened (1 byte of RAM: the smallest batch, 2)
    assert json.loads((out / "config.json").read_text())["data"]["batch_size"] == 2
    assert load_meta(out)["config"]["data"]["batch_size"] == 2
