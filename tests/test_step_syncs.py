"""The training loop never waits for the device between log lines (issue 18): on a GPU every `.item()`,
`.tolist()` or `bool(tensor)` stalls the CPU until the queue drains. Counted here on a CPU, where the same
Python calls are made: every such call is attributed to the step the loop is in, and only log and checkpoint
steps may have any."""

from __future__ import annotations

import pytest
import torch

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
RUN = ["--vit.dim", "32", "--vit.depth", "2", "--vit.heads", "2", "--head.hidden_dim", "64", "--head.out_dim", "32",
       "--head.num_prototypes", "32", "--data.batch_size", "8", "--data.global_size", "16", "--data.focal_size",
       "8", "--data.num_focal", "2", "--vit.img_size", "16", "--optim.epochs", "1", "--run.eval_lowshot", "false"]


def _count_syncs(monkeypatch, train_mod) -> list[tuple[int, str]]:
    where, calls = {"step": None}, []
    real_step = train_mod.train_step

    def located_step(model, batch, optimizer, sched, step, cfg):
        where["step"] = step + 1  # the loop's step number once this step is done
        return real_step(model, batch, optimizer, sched, step, cfg)

    monkeypatch.setattr(train_mod, "train_step", located_step)
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if where["step"] is not None:
                calls.append((where["step"], _name))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("nan_at", [None, 3])
def test_no_host_sync_outside_log_and_checkpoint_steps(tmp_path, monkeypatch, nan_at):
    """10 steps, a log line every 4 and a checkpoint every 6: syncs only at steps 1 (first line), 4, 6, 8, 10;
    with a NaN loss at step 3 too (the skip is decided on the device and reported at the next log line)."""
    from msn_fast import model as model_mod
    from msn_fast import train as train_mod

    if nan_at is not None:
        real_loss, n = model_mod.MSN.loss, {"calls": 0}

        def loss(self, *a, **k):
            n["calls"] += 1
            out, stats = real_loss(self, *a, **k)
            return (out * float("nan") if n["calls"] == nan_at else out), stats

        monkeypatch.setattr(model_mod.MSN, "loss", loss)
    calls = _count_syncs(monkeypatch, train_mod)
    out = tmp_path / "run"
    rc = train_mod.main(RUN + ["--run.log_every", "4", "--run.checkpoint_every", "6", "--run.max_steps", "10",
                               "--data.num_workers", "2", "--run.out_dir", str(out)])  # workers: views decoded apart
    monkeypatch.undo()
    assert rc == 0
    steps = sorted({s for s, _ in calls})
    assert set(steps) <= {1, 4, 6, 8, 10}, [c for c in calls if c[0] not in (1, 4, 6, 8, 10)][:10]
    assert {1, 4, 8} <= set(steps)  # the counting sees the log steps' reads
    import json

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 4, 8, 10]
    assert recs[-1]["skipped_steps"] == (0 if nan_at is None else 1)
