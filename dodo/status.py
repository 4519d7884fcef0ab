"""`dodo status`: what every run is doing, from its run directory and its backend."""

from __future__ import annotations

import time
from pathlib import Path

from dodo.rundir import RunDir
from dodo.train.metrics import format_duration

ACTIVE = ("created", "queued", "running", "requeued")


def run_is_active(run: RunDir) -> bool:
    """Running according to the run directory AND to the backend that holds it."""
    from dodo.cluster.backend import JobRecord, get_backend

    if run.status().get("state") not in ACTIVE:
        return False
    record = JobRecord.load(run)
    return record is not None and get_backend(record.backend).is_alive(record)


def effective_state(run: RunDir) -> str:
    """The recorded state, corrected when the processes behind a 'running' run are gone."""
    from dodo.cluster.backend import JobRecord, get_backend

    if (run.job / "cancelled").exists():  # dodo cancel; ranks may still write "stopped" after it
        return "cancelled"
    state = run.status().get("state", "unknown")
    if state in ACTIVE and not run_is_active(run):
        record = JobRecord.load(run)
        said = get_backend(record.backend).scheduler_state(record) if record else None
        why = f" ({record.backend}: {said})" if said and said != "GONE" else ""
        label = {"running": "failed (processes gone)", "requeued": "failed after a requeue"}
        return label.get(state, "never started") + why
    return state


def find_runs(runs_dir: Path) -> list[RunDir]:
    return [RunDir(p.parent) for p in sorted(runs_dir.glob("*/*/config.yaml"))]


def find_sweeps(runs_dir: Path) -> list[Path]:
    """Sweep folders (dodo sweep): runs/<name>/sweep_<id>/ with sweep.json and one run per point."""
    return [p.parent for p in sorted(runs_dir.glob("*/*/sweep.json"))]


def status_row(run: RunDir) -> list[str]:
    from dodo.cluster.backend import JobRecord
    from dodo.cluster.continuation import requeue_log

    s = run.status()
    record = JobRecord.load(run)
    total = s.get("total_steps")
    loss = s.get("last_loss")
    elapsed = s.get("updated", time.time()) - s.get("created", s.get("updated", time.time()))
    return [f"{run.path.parent.name}/{run.path.name}", record.backend if record else "-",
            record.job_id if record else "-", effective_state(run),
            f"{s.get('step', 0)}/{total}" if total else "-",
            f"{loss:.4f}" if isinstance(loss, float) else "-", str(len(requeue_log(run))),
            format_duration(elapsed)]


def print_status(run_path: str | None, runs_dir: str) -> int:
    from dodo.cluster.chain import Chain
    from dodo.cluster.sweep import Sweep

    chains: list[Chain] = []
    if run_path and (Path(run_path) / "sweep.json").is_file():
        runs, sweeps = [], [Sweep.open(run_path)]
    elif run_path and (Path(run_path) / "chain.json").is_file():
        runs, sweeps, chains = [], [], [Chain.open(run_path)]
    elif run_path:
        runs, sweeps = [RunDir.open(run_path)], []
    else:
        runs, sweeps = find_runs(Path(runs_dir)), [Sweep.open(p) for p in find_sweeps(Path(runs_dir))]
        chains = [Chain.open(p.parent) for p in sorted(Path(runs_dir).glob("*/*/chain.json"))]
    if not runs and not sweeps and not chains:
        print(f"no runs under {runs_dir}/ (submit one with `dodo submit jobs/demo.yaml`)")
        return 0
    header = ["run", "backend", "job id", "state", "step", "last loss", "requeues", "elapsed"]
    rows: list[list[str] | str] = [header] + [status_row(r) for r in runs]
    for sweep in sweeps:  # a title line, then one indented row per point
        rows.append(sweep.title())
        for point, run in zip(sweep.points, sweep.runs()):
            row = status_row(run)
            rows.append([f"  {point.label}"] + row[1:])
    for chain in chains:  # a title line, one row per stage run, and why a stage did not run
        rows.append(chain.title())
        for inst in chain.instances:
            rows.append([f"  {inst.dir}"] + status_row(chain.run(inst))[1:])
            note = chain.note(inst, effective_state)
            if note:
                rows.append(f"    {note}")
    table = [r for r in rows if isinstance(r, list)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in rows:
        print(row if isinstance(row, str) else "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if run_path and len(runs) == 1:  # one run: its restarts, faults, excluded hosts, segments
        from dodo.train.provenance import run_details

        print("\n".join(run_details(runs[0])))
    return 0
