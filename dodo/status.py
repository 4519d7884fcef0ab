"""`dodo status`: what every run is doing, from its run directory and its backend."""

from __future__ import annotations

import time
from pathlib import Path

from dodo.rundir import RunDir
from dodo.train.metrics import format_duration

ACTIVE = ("created", "running")


def run_is_active(run: RunDir) -> bool:
    """Running according to the run directory AND to the backend that holds it."""
    from dodo.cluster.backend import JobRecord, get_backend

    if run.status().get("state") not in ACTIVE:
        return False
    record = JobRecord.load(run)
    return record is not None and get_backend(record.backend).is_alive(record)


def effective_state(run: RunDir) -> str:
    """The recorded state, corrected when the processes behind a 'running' run are gone."""
    state = run.status().get("state", "unknown")
    if state in ACTIVE and not run_is_active(run):
        return "failed (processes gone)" if state == "running" else "never started"
    return state


def find_runs(runs_dir: Path) -> list[RunDir]:
    return [RunDir(p.parent) for p in sorted(runs_dir.glob("*/*/config.yaml"))]


def status_row(run: RunDir) -> list[str]:
    from dodo.cluster.backend import JobRecord

    s = run.status()
    record = JobRecord.load(run)
    total = s.get("total_steps")
    loss = s.get("last_loss")
    elapsed = s.get("updated", time.time()) - s.get("created", s.get("updated", time.time()))
    return [f"{run.path.parent.name}/{run.path.name}", record.backend if record else "-",
            record.job_id if record else "-", effective_state(run),
            f"{s.get('step', 0)}/{total}" if total else "-",
            f"{loss:.4f}" if isinstance(loss, float) else "-", format_duration(elapsed)]


def print_status(run_path: str | None, runs_dir: str) -> int:
    runs = [RunDir.open(run_path)] if run_path else find_runs(Path(runs_dir))
    if not runs:
        print(f"no runs under {runs_dir}/ (submit one with `dodo submit jobs/demo.yaml`)")
        return 0
    header = ["run", "backend", "job id", "state", "step", "last loss", "elapsed"]
    rows = [header] + [status_row(r) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
