"""Rank-0 metrics: metrics.jsonl, TensorBoard, and a progress line with loss, samples/s, ETA."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from dodo.rundir import RunDir, write_atomic


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends metrics rows; on resume, rows past the checkpoint's step are dropped first,
    so a run that was interrupted and resumed has one row per step, like a straight run.
    The other trackers of train.trackers (dodo/train/trackers.py) get every row too."""

    def __init__(self, run: RunDir, resume_step: int, trackers: list[str] | None = None,
                 name: str = "dodo", params: dict[str, Any] | None = None):
        from dodo.train.trackers import open_trackers

        self.path = run.metrics
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")
        self.trackers = open_trackers(trackers or ["jsonl", "tensorboard"], run, name, resume_step, params or {})

    def write(self, step: int, **values: Any) -> None:
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.file.flush()
        for tracker in self.trackers:
            tracker.write(step, values)

    def close(self, state: str = "stopped") -> None:
        """`state`: how the allocation ended (completed | stopped | failed), for the trackers."""
        self.file.close()
        for tracker in self.trackers:
            tracker.close(state)


class Progress:
    """One status line per log interval; redrawn in place (\\r) when DODO_PROGRESS=bar or a TTY."""

    def __init__(self, total_steps: int, start_step: int, samples_per_step: int):
        self.total, self.start, self.samples_per_step = total_steps, start_step, samples_per_step
        self.t0 = time.perf_counter()
        self.inplace = os.environ.get("DODO_PROGRESS") == "bar" or sys.stdout.isatty()

    def update(self, step: int, loss: float, lr: float) -> str:
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        rate = done * self.samples_per_step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / done if done else 0.0
        width = 20
        filled = int(width * step / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} | loss {loss:.4f} | "
                f"lr {lr:.2e} | {rate:.0f} samples/s | ETA {format_duration(eta)}")
        print(("\r" + line) if self.inplace else line, end="" if self.inplace else "\n", flush=True)
        return line

    def close(self) -> None:
        if self.inplace:
            print(flush=True)
