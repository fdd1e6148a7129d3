"""Fault injection: SIGKILL at every disk step of a checkpoint save, crafted run folders, poisoned steps.

What must hold (issue 14): a run killed at any point of a save resumes from the newest complete checkpoint
(the old one or the new one, never a broken one) and continues with the losses of an uninterrupted run;
nothing read from a run folder executes code; a skipped non-finite step changes no state.
The kill points come from tests/kill_points.py (every open-for-write, mkdir, rename, fsync, unlink, rmtree).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import kill_points
import pytest
import torch

from msn_fast.build import build_optimizer
from msn_fast.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    load_meta,
    read_dcp_metadata,
    resolve,
    save_checkpoint,
)
from msn_fast.cli import apply_overrides
from msn_fast.model import MSN
from msn_fast.recipes import get_recipe

SMALL = ["--vit.dim", "16", "--vit.depth", "1", "--vit.heads", "2", "--head.hidden_dim", "16", "--head.out_dim",
         "8", "--head.num_prototypes", "8", "--vit.img_size", "16", "--data.global_size", "16", "--data.focal_size",
         "8"]
HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}


def _model_and_optimizer(seed: int):
    cfg = apply_overrides(get_recipe("cpu_demo"), SMALL)
    torch.manual_seed(seed)
    model = MSN(cfg)
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    return cfg, model, opt


def _advance(model, opt, seed: int) -> dict:
    """One optimizer step with random gradients and new BN statistics; returns a copy of every tensor."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    for name, b in model.named_buffers():
        if b.is_floating_point():
            b.add_(torch.rand(b.shape, generator=g))
    return _snapshot(model, opt)


def _snapshot(model, opt) -> dict:
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"optim.{i}.{k}"] = v.clone() if torch.is_tensor(v) else torch.tensor(v)
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loaded(out) -> tuple[int, dict]:
    """(step, every tensor) of the checkpoint a resume would load."""
    _, model, opt = _model_and_optimizer(123)
    meta = load_checkpoint(out, model=model, optimizer=opt)
    return meta["step"], _snapshot(model, opt)


def _save(out, model, opt, step, keep=2):
    return save_checkpoint(out, model=model, optimizer=opt, step=step, config={}, keep=keep)


def _save_in_child(out, model, opt, step, kill_at, keep=2) -> str:
    """Save in a forked child armed to SIGKILL itself at tick `kill_at` (None: count only, the count returned
    through a pipe). Returns "killed", "done:<ticks>", or "hung" for a child killed after 120 s (a fork of this
    multi-threaded process can inherit a lock another thread held, and then never run the save at all)."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a process with threads: the child is short
        pid = os.fork()
    if pid == 0:  # child: one thread (libgomp is not fork-safe), never returns into pytest
        code = 1
        try:
            os.close(r)
            torch.set_num_threads(1)
            kill_points.arm(kill_at, out)
            _save(out, model, opt, step, keep)
            ticks = kill_points.disarm()
            os.write(w, str(ticks).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return "hung"
        time.sleep(0.01)
    msg = os.read(r, 64).decode()
    os.close(r)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed"
    assert os.WEXITSTATUS(status) == 0, f"save child failed (kill_at={kill_at})"
    return f"done:{msg}"


def _save_past_hangs(out, prepare, step, kill_at, keep=2):
    """_save_in_child on the state `prepare` builds in `out`; when the fork hangs (see _save_in_child: the fork's
    fault, not the save's), again from a fresh folder, up to 3 more times (CI once saw two hangs in a row at one
    kill point, and once one at the count-only save). Returns (result, the folder used, the checkpoint committed
    before, the model and optimizer saved)."""
    for again in range(4):
        folder = out if again == 0 else out.with_name(f"{out.name}_again{again}")
        model, opt, before = prepare(folder)
        got = _save_in_child(folder, model, opt, step, kill_at, keep)
        if got != "hung":
            break
    return got, folder, before, model, opt


def _every_kill_point(tmp_path, prepare, step, expect, keep=2) -> tuple[int, int]:
    """Kill a save of `step` at each of its ticks, on a fresh copy of the state `prepare` builds; after each kill
    the checkpoint a resume finds must be complete and equal one of `expect` (step -> tensors) exactly.
    Returns the number of ticks of a whole save (= the kill points tried)."""
    model, opt, _ = prepare(tmp_path / "warm-up")  # lazy imports happen here, not in the counted save
    _save(tmp_path / "warm-up", model, opt, step, keep)
    done = _save_past_hangs(tmp_path / "count", prepare, step, None, keep)[0]
    assert done.startswith("done:"), done
    ticks = int(done.split(":")[1])
    for k in range(1, ticks + 1):
        got, out, before, model, opt = _save_past_hangs(tmp_path / f"kill_{k}", prepare, step, k, keep)
        assert got == "killed", (k, got)
        found = find_checkpoint(out)
        if found is None:
            assert before is None, f"kill point {k}: the previous checkpoint was lost"
            continue
        got_step, tensors = _loaded(out)
        assert got_step in expect, (k, got_step)
        assert _same(tensors, expect[got_step]), f"kill point {k}: step {got_step} does not load exactly"
        if before is not None:
            assert got_step >= before, f"kill point {k}: went back past the committed step {before}"
        # and the run can go on: the next save after the kill commits cleanly
        _save(out, model, opt, step, keep)
        assert load_meta(out)["step"] == step
    return ticks


def test_sigkill_at_every_point_of_a_save(tmp_path):
    """A first save, a second one (a new step), a third that prunes with keep=1, and one over the broken state
    an older version left: at every kill point the newest complete checkpoint loads bit-exactly, and a committed
    one is never removed before its successor is committed."""
    _, model, opt = _model_and_optimizer(0)
    s5 = _advance(model, opt, 5)
    s10 = _advance(model, opt, 10)
    s15 = _advance(model, opt, 15)
    states = {5: s5, 10: s10, 15: s15}

    def at(step_state, committed):
        """A prepare() that replays the steps up to `step_state`, committing those in `committed`."""
        def prepare(out):
            _, m, o = _model_and_optimizer(0)
            for s in (5, 10, 15):
                if s <= step_state:
                    _advance(m, o, s)
                if s in committed:
                    _save(out, m, o, s)
            return m, o, (committed[-1] if committed else None)
        return prepare

    def legacy(out):
        """The state an old version's killed rewrite left: `latest` -> an empty step_0000010/."""
        m, o, _ = at(10, [5])(out)
        (out / "checkpoints" / "step_0000010").mkdir()
        (out / "checkpoints" / "latest").write_text("step_0000010")
        return m, o, 5

    tried = 0
    for name, prepare, step, keep, committed in (("first", at(5, []), 5, 2, []),
                                                  ("second", at(10, [5]), 10, 2, [5]),
                                                  ("pruning", at(15, [5, 10]), 15, 1, [5, 10]),
                                                  ("over-legacy", legacy, 10, 2, [5])):
        ticks = _every_kill_point(tmp_path / name, prepare, step, {s: states[s] for s in committed + [step]}, keep)
        assert ticks >= 8, ticks  # mkdir, DCP files, rng, meta, fsyncs, renames: a real save has many points
        tried += ticks
    print(f"kill points tried: {tried}")


def test_a_committed_step_is_not_written_again(tmp_path):
    """The second save of a committed step (a signal on a checkpoint step, a resumed finished run) touches
    nothing on disk, so no kill during it can break the checkpoint."""
    _, model, opt = _model_and_optimizer(0)
    s5 = _advance(model, opt, 5)
    path = _save(tmp_path, model, opt, 5)
    stamp = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    _advance(model, opt, 6)  # even if the state changed in memory, the committed step is the truth
    for _ in range(3):  # a hang is the fork's (see _save_in_child); the child wrote nothing, so again in place
        got = _save_in_child(tmp_path, model, opt, 5, None)
        if got != "hung":
            break
    assert got == "done:0"
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamp
    assert _same(_loaded(tmp_path)[1], s5)


def test_a_step_committed_under_another_config_is_replaced(tmp_path):
    """A resume with another training config (a lower lr, as the divergence message advises) that reaches a
    step committed before: that step holds the other config's state, so it is replaced, not kept."""
    _, model, opt = _model_and_optimizer(0)
    _advance(model, opt, 5)
    save_checkpoint(tmp_path, model=model, optimizer=opt, step=5,
                    config={"optim": {"lr": 1e-3}, "run": {"seed": 0, "max_steps": 5}})
    s_new = _advance(model, opt, 6)
    same_run = {"optim": {"lr": 1e-3}, "run": {"seed": 0, "max_steps": 99}}  # only the run length differs
    path = tmp_path / "checkpoints" / "step_0000005"
    stamp = (path / "meta.pt").stat().st_mtime_ns
    save_checkpoint(tmp_path, model=model, optimizer=opt, step=5, config=same_run)
    assert (path / "meta.pt").stat().st_mtime_ns == stamp  # same training config: kept
    save_checkpoint(tmp_path, model=model, optimizer=opt, step=5, config={"optim": {"lr": 5e-4}, "run": {"seed": 0}})
    step, tensors = _loaded(tmp_path)
    assert step == 5 and _same(tensors, s_new)
    assert load_meta(tmp_path)["config"]["optim"]["lr"] == 5e-4


def test_meta_holds_what_is_read_and_an_earlier_versions_meta_still_loads(tmp_path):
    """meta.pt holds the step (the data position follows from it), process count, config and extra, each read by a
    resume or a load; an earlier version's meta.pt, which also held epoch and batch_in_epoch, still loads."""
    _, model, opt = _model_and_optimizer(0)
    s5 = _advance(model, opt, 5)
    path = _save(tmp_path, model, opt, 5)
    meta = torch.load(path / "meta.pt", weights_only=True)
    assert set(meta) == {"format", "step", "world", "config", "extra"}
    torch.save({**meta, "epoch": 0, "batch_in_epoch": 5}, path / "meta.pt")  # as earlier versions wrote it
    assert load_meta(tmp_path)["step"] == 5
    step, tensors = _loaded(tmp_path)
    assert step == 5 and _same(tensors, s5)


def test_broken_latest_falls_back_to_the_newest_complete_step(tmp_path, caplog):
    """The state the issue found: `latest` -> an empty step_0000010/ (an old version's killed rewrite)."""
    _, model, opt = _model_and_optimizer(0)
    s5 = _advance(model, opt, 5)
    _save(tmp_path, model, opt, 5)
    root = tmp_path / "checkpoints"
    (root / "step_0000010").mkdir()
    (root / "latest").write_text("step_0000010")
    with caplog.at_level(logging.WARNING, logger="msn_fast.checkpoint"):
        assert resolve(tmp_path) == root / "step_0000005"
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "step_0000010" in warning and "step_0000005" in warning and "incomplete" in warning
    step, tensors = _loaded(tmp_path)
    assert step == 5 and _same(tensors, s5)
    # a truncated meta.pt or a missing rng file also makes a step incomplete
    for damage in ("meta", "rng"):
        s10 = _advance(model, opt, 10 + len(damage))
        _save(tmp_path, model, opt, 10)
        victim = root / "step_0000010" / ("meta.pt" if damage == "meta" else "rng_0.pt")
        if damage == "meta":
            victim.write_bytes(victim.read_bytes()[:40])
        else:
            victim.unlink()
        assert resolve(tmp_path) == root / "step_0000005", damage
        _save(tmp_path, model, opt, 10)  # the incomplete folder is replaced by a complete one
        step, tensors = _loaded(tmp_path)
        assert step == 10 and _same(tensors, s10), damage
        (root / "latest").write_text("step_0000005")
        import shutil
        shutil.rmtree(root / "step_0000010")
    # nothing complete left: one clear error naming the pointer
    shutil.rmtree(root / "step_0000005")
    (root / "step_0000005").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint is left"):
        resolve(tmp_path)


def test_keep_checkpoints(tmp_path):
    _, model, opt = _model_and_optimizer(0)
    for step in (1, 2, 3, 4):
        _advance(model, opt, step)
        _save(tmp_path, model, opt, step, keep=3)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000003", "step_0000004"]
    _save(tmp_path, model, opt, 5, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000005"]
    with pytest.raises(ValueError, match="keep=0"):
        _save(tmp_path, model, opt, 6, keep=0)


# --- crafted files: nothing read from a run folder executes code ----------------------------------------------


class _Payload:
    """Unpickling this calls os.system: what an attacker puts in a shared run folder."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _committed_run(tmp_path) -> Path:
    _, model, opt = _model_and_optimizer(0)
    _advance(model, opt, 1)
    return _save(tmp_path, model, opt, 1)


def test_crafted_dcp_metadata_is_refused_and_never_runs(tmp_path):
    step_dir = _committed_run(tmp_path / "run")
    marker = tmp_path / "pwned"
    real = step_dir / ".metadata"
    md = pickle.loads(real.read_bytes())
    md.storage_meta = _Payload(marker)  # a valid Metadata with a poisoned field
    real.write_bytes(pickle.dumps(md))
    for load in (lambda: _loaded(tmp_path / "run"), lambda: read_dcp_metadata(real)):
        with pytest.raises(CheckpointError, match="unsafe or corrupt") as e:
            load()
        assert "posix.system" in str(e.value) or "os.system" in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
    assert not marker.exists()
    real.write_bytes(pickle.dumps(_Payload(marker)))  # a bare payload
    with pytest.raises(CheckpointError, match="unsafe or corrupt"):
        read_dcp_metadata(real)
    assert not marker.exists()
    # an allowed class, but BUILD aimed at the class itself: would set PosixPath._str for the whole process
    build_on_class = (b"\x80\x04cpathlib\nPosixPath\n" b"N}\x8c\x04_str\x8c\x05/evil\x86b.")
    real.write_bytes(build_on_class)
    with pytest.raises(CheckpointError, match="refusing to set the state"):
        read_dcp_metadata(real)
    assert str(Path("/work/x")) == "/work/x" and "_str" not in vars(pathlib.PosixPath)
    # a valid metadata whose shard name leaves the folder: DCP would open any file on the machine
    md.storage_meta = None
    info = next(iter(md.storage_data.values()))
    info.relative_path = "../../../etc/passwd"
    real.write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="names a shard outside its folder"):
        read_dcp_metadata(real)


def _poison_byte_entry(step_dir: Path, marker: Path) -> None:
    """Rewrite the DCP shards of `step_dir` with the payload as a non-tensor entry (an optimizer lr)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    _, model, opt = _model_and_optimizer(0)
    _advance(model, opt, 1)
    model_sd, optim_sd = get_state_dict(model, opt)
    optim_sd["param_groups"][0]["lr"] = _Payload(marker)
    for f in step_dir.iterdir():
        if f.name == ".metadata" or f.suffix == ".distcp":
            f.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(step_dir))


def test_crafted_dcp_byte_entry_is_refused_and_never_runs(tmp_path):
    step_dir = _committed_run(tmp_path / "run")
    marker = tmp_path / "pwned"
    _poison_byte_entry(step_dir, marker)
    with pytest.raises(CheckpointError, match="unsafe or corrupt") as e:
        _loaded(tmp_path / "run")
    assert "\n" not in str(e.value) and "lr" in str(e.value), str(e.value)
    assert not marker.exists()


def _eval_data(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_crafted_files_through_the_clis_never_run(tmp_path):
    """The payload as `.metadata`, `meta.pt`, `rng_0.pt` and a DCP byte entry of a run folder, loaded by the
    evaluation CLI and by a resumed training run: exit 2, one error line naming the file, no file created.
    Truncated files are the same one-line error."""
    run = tmp_path / "run"
    step_dir = _committed_run(run)
    data = _eval_data(tmp_path / "data")
    marker = tmp_path / "pwned"
    originals = {p.name: p.read_bytes() for p in step_dir.iterdir() if p.is_file()}
    payload = pickle.dumps(_Payload(marker))
    evaluate = [sys.executable, "-m", "msn_fast.eval", "--checkpoint", str(run), "--data", str(data), "--no-cache"]
    resume = [sys.executable, "-m", "msn_fast.train", *SMALL, "--run.out_dir", str(run), "--run.resume", "true",
              "--run.max_steps", "2", "--data.num_workers", "0", "--data.batch_size", "8"]
    cases = [(".metadata", evaluate), (".metadata", resume), ("meta.pt", evaluate), ("meta.pt", resume),
             ("rng_0.pt", resume), ("lr entry", resume), ("rng_0.pt truncated", resume),
             (".metadata truncated", evaluate)]
    for name, cmd in cases:
        for f in step_dir.iterdir():
            if f.is_file():
                f.unlink()
        for f, b in originals.items():
            (step_dir / f).write_bytes(b)
        if name == "lr entry":
            _poison_byte_entry(step_dir, marker)
        elif name.endswith("truncated"):
            victim = step_dir / name.split()[0]
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        else:
            (step_dir / name).write_bytes(payload)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
        err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(err) == 1, (name, cmd[2], r.returncode, r.stderr[-1500:])
        assert "Traceback" not in r.stderr and ("unsafe" in err[0] or "unreadable" in err[0]), (name, err)
        assert name.split()[0] in err[0] or "step_0000001" in err[0], (name, err)
        assert not marker.exists(), f"{name} ran code through {cmd[2]}"
    print(f"crafted files tried: {len(cases)}")


# --- the trainer: killed saves resume with the losses of an uninterrupted run --------------------------------

RUN = ["--vit.dim", "32", "--vit.depth", "2", "--vit.heads", "2", "--head.hidden_dim", "64", "--head.out_dim", "32",
       "--head.num_prototypes", "32", "--data.batch_size", "8", "--data.num_workers", "0", "--data.global_size",
       "16", "--data.focal_size", "8", "--data.num_focal", "2", "--vit.img_size", "16", "--run.log_every", "1",
       "--optim.epochs", "1", "--run.eval_lowshot", "false", "--run.checkpoint_every", "4", "--run.max_steps", "8"]


def _losses(out) -> dict[int, float]:
    """step -> loss of the last time the step was logged (a resumed run logs its steps again)."""
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def _killed_run(out, n_save, kill_at, count_file, extra=()):
    cmd = [sys.executable, str(HERE / "kill_points.py"), str(n_save), str(kill_at), str(count_file), "--", *RUN,
           *extra, "--run.out_dir", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)


def test_trainer_killed_while_saving_resumes_with_the_uninterrupted_losses(tmp_path):
    """8 steps, checkpoints at 4 and 8: SIGKILL at points spread over the final save (step 8), then
    `--run.resume true` gives the 8-step run's losses from wherever it resumed (step 4 or step 8). Every run is
    a fresh process with one thread, so the comparison is of the same computation (rel 1e-6 leaves room only
    for BLAS buffer alignment; a wrong data position, RNG or optimizer state moves the loss by far more)."""
    count = tmp_path / "ticks"
    r = _killed_run(tmp_path / "full", 2, 0, count)  # count only: the uninterrupted run, the reference
    assert r.returncode == 0, r.stderr[-2000:]
    reference = _losses(tmp_path / "full")
    assert sorted(reference) == list(range(1, 9))
    ticks = int(count.read_text())
    assert ticks >= 10, ticks
    resumed_from = {}
    for k in sorted({1, ticks // 4, ticks // 2, 3 * ticks // 4, ticks}):
        out = tmp_path / f"kill_{k}"
        r = _killed_run(out, 2, k, tmp_path / f"unused_{k}")
        assert r.returncode == -signal.SIGKILL, (k, r.stderr[-2000:])
        start = load_meta(out)["step"]
        assert start in (4, 8), (k, start)
        logged_before = len((out / "metrics.jsonl").read_text().splitlines())
        r = subprocess.run([sys.executable, "-m", "msn_fast.train", *RUN, "--run.out_dir", str(out), "--run.resume",
                            "true"], capture_output=True, text=True, timeout=600, env=ENV)  # as the killed run ran
        assert r.returncode == 0, (k, r.stderr[-2000:])
        assert f"resumed from {out / 'checkpoints' / f'step_{start:07d}'} at step {start}" in r.stderr, r.stderr
        new = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[logged_before:]]
        assert [m["step"] for m in new] == list(range(start + 1, 9)), (k, [m["step"] for m in new])
        for m in new:  # the steps redone after the resume, logged by the resumed run itself
            s = m["step"]
            assert m["loss"] == pytest.approx(reference[s], rel=1e-6, abs=0), (k, s, m["loss"], reference[s])
        assert load_meta(out)["step"] == 8
        resumed_from[k] = start
    print(f"trainer kill points {sorted(resumed_from)} of {ticks}: resumed from {resumed_from}")
    assert 4 in resumed_from.values()  # at least one kill lost the new checkpoint and fell back


def test_finished_run_resumed_and_signal_on_a_checkpoint_step_write_nothing(tmp_path, monkeypatch, capfd):
    """`--run.resume true` on a finished run (and with a lower --run.max_steps) and SIGTERM arriving during a
    periodic save: the committed step is not written again (0 disk steps, so no kill point), exit 0 / 143."""
    from msn_fast import train as train_mod

    out = tmp_path / "run"
    assert train_mod.main(RUN + ["--run.out_dir", str(out)]) == 0
    step_dir = out / "checkpoints" / "step_0000008"
    stamp = {p.name: p.stat().st_mtime_ns for p in step_dir.iterdir()}
    for extra in ([], ["--run.max_steps", "4"]):
        count = tmp_path / f"ticks{len(extra)}"
        r = _killed_run(out, 1, 1, count, ["--run.resume", "true", *extra])  # would die at its first disk step
        assert r.returncode == 0, r.stderr[-2000:]
        assert count.read_text() == "0" and "already committed" in r.stderr
        assert load_meta(out)["step"] == 8
    assert {p.name: p.stat().st_mtime_ns for p in step_dir.iterdir()} == stamp

    real = train_mod.save_checkpoint
    calls = []

    def save_then_sigterm(*a, **k):
        calls.append(k["step"])
        path = real(*a, **k)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # lands while the step-4 checkpoint is being written
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_sigterm)
    out2 = tmp_path / "sigterm"
    capfd.readouterr()
    assert train_mod.main(RUN + ["--run.out_dir", str(out2)]) == 128 + signal.SIGTERM
    assert calls == [4, 4]
    assert "step_0000004 is already committed" in capfd.readouterr().err
    assert load_meta(out2)["step"] == 4 and sorted(_losses(out2)) == [1, 2, 3, 4]


def test_fresh_run_in_a_used_folder_keeps_the_old_run(tmp_path, capfd):
    """Without --run.resume, an earlier run's checkpoints, metrics and log are moved aside, not overwritten or
    mixed with the new run's."""
    from msn_fast.train import main

    out = tmp_path / "run"
    assert main(RUN + ["--run.out_dir", str(out), "--run.max_steps", "4"]) == 0
    old = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    capfd.readouterr()
    assert main(RUN + ["--run.out_dir", str(out), "--run.max_steps", "2"]) == 0
    kept = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(kept) == 1 and (kept[0] / "checkpoints" / "step_0000004").is_dir()
    assert all((kept[0] / name).read_bytes() == data for name, data in old.items())
    assert f"moved to {kept[0]}" in capfd.readouterr().err
    assert load_meta(out)["step"] == 2 and load_meta(kept[0])["step"] == 4
    assert sorted(_losses(out)) == [1, 2]  # the new run's metrics alone


# --- a skipped step changes nothing; a non-finite state is never committed ------------------------------------


def _batch(cfg, seed):
    from msn_fast.dataloading.loader import MultiViewBatch

    g = torch.Generator().manual_seed(seed)
    d, b = cfg.data, 4
    return MultiViewBatch(torch.randn(2, b, 3, d.global_size, d.global_size, generator=g),
                          torch.randn(d.num_focal, b, 3, d.focal_size, d.focal_size, generator=g),
                          torch.full((b,), -1))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_skipped_step_leaves_every_tensor_bit_identical(monkeypatch, poison):
    from msn_fast.schedules import Schedules
    from msn_fast.step import train_step

    cfg = apply_overrides(get_recipe("cpu_demo"), SMALL + ["--data.num_focal", "2"])
    torch.manual_seed(0)
    model = MSN(cfg)
    model.train()
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    sched = Schedules(cfg.optim, 100, 10)
    assert bool(train_step(model, _batch(cfg, 0), opt, sched, 0, cfg).ok)  # optimizer state exists now
    before = _snapshot(model, opt)
    real = MSN.loss

    def poisoned(self, *a, **k):
        loss, stats = real(self, *a, **k)  # the forward runs: BatchNorm statistics are updated...
        return loss * poison, stats

    monkeypatch.setattr(MSN, "loss", poisoned)
    assert not bool(train_step(model, _batch(cfg, 1), opt, sched, 1, cfg).ok)  # ...and the step is skipped
    after = _snapshot(model, opt)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    assert any("running_mean" in k for k in before)  # the BN buffers were part of the comparison
    monkeypatch.setattr(MSN, "loss", real)
    assert bool(train_step(model, _batch(cfg, 1), opt, sched, 1, cfg).ok)
    assert not torch.equal(_snapshot(model, opt)["model.prototypes"], before["model.prototypes"])  # it moves


def test_non_finite_state_is_never_committed_and_divergence_names_only_real_checkpoints(tmp_path, monkeypatch,
                                                                                          capsys):
    from msn_fast import model as model_mod
    from msn_fast import step as step_mod
    from msn_fast import train as train_mod

    real_ema = step_mod.ema_update

    def poisoned_ema(target, student, m, skip=None):
        real_ema(target, student, m, skip=skip)
        next(target.parameters()).data.fill_(float("nan"))

    monkeypatch.setattr(step_mod, "ema_update", poisoned_ema)
    out = tmp_path / "nan_state"
    assert train_mod.main(RUN + ["--run.out_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "model state is not finite" in err and "not saved" in err and "No checkpoint was saved" in err, err
    assert find_checkpoint(out) is None
    monkeypatch.setattr(step_mod, "ema_update", real_ema)

    real_loss = model_mod.MSN.loss
    monkeypatch.setattr(model_mod.MSN, "loss", lambda self, *a, **k: (lambda r: (r[0] * float("nan"), r[1]))(
        real_loss(self, *a, **k)))
    out = tmp_path / "diverged"
    assert train_mod.main(RUN + ["--run.out_dir", str(out), "--run.max_bad_steps", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    line = [e for e in err if e.startswith("error:")]
    assert len(line) == 1 and "3 consecutive non-finite losses" in line[0], err
    assert "No checkpoint was saved" in line[0] and "last good checkpoint" not in line[0], line
    assert find_checkpoint(out) is None


# --- bad data through the trainer: one line, exit 2 -----------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_unusable_folders_are_one_line_errors(tmp_path, capsys, workers):
    import numpy as np
    from PIL import Image

    from msn_fast.train import main

    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(21):
        (broken / f"{i:02d}.jpg").write_bytes(b"\xff\xd8 not a jpeg" if i % 2 else b"")
    few = tmp_path / "few"
    few.mkdir()
    for i in range(5):
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(few / f"{i}.png")
    common = ["--run.max_steps", "2", "--run.eval_lowshot", "false", "--data.num_workers", str(workers)]
    cases = [(broken, ["--data.batch_size", "8"], f"all 21 images in {broken} are unreadable"),
             (few, ["--data.batch_size", "8"], "5 images are too few for batch size 8")]
    for data, extra, message in cases:
        capsys.readouterr()
        rc = main(SMALL + common + extra + ["--data.path", str(data), "--run.out_dir", str(tmp_path / "out")])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(err) == 1 and message in err[0], (rc, err)
