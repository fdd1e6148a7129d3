"""Run logging: stdlib logging to the terminal (rank 0 at INFO, others at WARNING) and JSONL metrics."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not the stream of the first call (a caller
    that redirects or captures stderr after setup, e.g. a notebook or a test, still gets the lines)."""

    def __init__(self):
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(rank: int = 0, log_file: str | Path | None = None) -> None:
    root = logging.getLogger("msn_fast")
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    handler = _StderrHandler()
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if log_file is not None and rank == 0:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False


class JsonlWriter:
    """Appends one JSON object per line; rank 0 only (others pass enabled=False)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class StepLogger:
    """One log line every `every` steps and after the first (whose time is reported truthfully), each value after
    its name (`loss 6.1234 ce 6.9012 ...`); the same record in JSONL (and TensorBoard when installed), and a live
    status line on an interactive terminal. Throughput and MFU are measured between log lines; the GPU peak memory
    is reset after each."""

    def __init__(self, total: int, images_per_step: int, flops_per_image: float, peak_flops: float | None,
                 device, jsonl: JsonlWriter, every: int, tensorboard_dir: Path | None = None):
        self.total, self.images_per_step, self.every = total, images_per_step, every
        self.flops_per_image, self.peak_flops, self.device, self.jsonl = flops_per_image, peak_flops, device, jsonl
        self.skipped = 0
        self._last_loss = None
        self._clock = time.perf_counter
        self._t0 = self._t = self._clock()
        self._n = 0
        self._done = 0
        self.tty = jsonl.enabled and sys.stderr.isatty()
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except Exception:  # tensorboard is optional
                self.tb = None

    def tick(self, step: int) -> None:
        """Every step: count it and redraw the terminal's status line (no tensor is read here)."""
        self._n += 1
        self._done += 1
        if self.tty:
            bar = int(30 * step / max(1, self.total))
            loss = f" loss {self._last_loss:.4f}" if self._last_loss is not None else ""
            sys.stderr.write(f"\r[{'#' * bar}{'.' * (30 - bar)}] {step}/{self.total}{loss}")
            sys.stderr.flush()

    def due(self, step: int, first: bool = False) -> bool:
        """Whether `step` gets a log line (every `every` steps, the first and the last)."""
        return first or step % self.every == 0 or step == self.total

    def log(self, step: int, epoch: int, m: dict, skipped_images: int, first: bool = False) -> None:
        """The log line and record of a due step (after tick(step)); `m` holds Python numbers."""
        import torch

        self._last_loss = m["loss"]
        now = self._clock()
        dt = (now - self._t) / max(1, self._n)
        ips = self.images_per_step / dt
        eta = (self.total - step) * (now - self._t0) / self._done
        rec = {"step": step, "epoch": epoch, **m, "img_per_s": ips, "s_per_step": dt, "skipped_images": skipped_images,
               "skipped_steps": self.skipped}
        extra = ""
        if self.peak_flops:
            rec["mfu"] = ips * self.flops_per_image / self.peak_flops
            extra += f" mfu {100 * rec['mfu']:.1f}%"
        if getattr(self.device, "type", "") == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
            extra += f" mem {rec['peak_mem_gib']:.1f}GiB"
        if self.tty:
            sys.stderr.write("\r")
        logging.getLogger("msn_fast.train").info(
            "step %d/%d epoch %d loss %.4f ce %.4f me_max %.4f np %.0f max_t %.3f lr %.2e wd %.3f m %.4f | "
            "%.1f img/s %.2f s/step%s ETA %s", step, self.total, epoch, m["loss"], m["ce"], m["me_max"],
            m["num_targets"], m["max_t"], m["lr"], m["wd"], m["momentum"], ips, dt, extra, format_duration(eta))
        self.jsonl.write(rec)
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        self._t, self._n = now, 0

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        if self.tb is not None:
            self.tb.close()
