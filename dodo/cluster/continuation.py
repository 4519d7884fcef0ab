"""What follows an allocation: done, requeue, stop at the cap, or fail. Runs in the batch shell.

The ranks handle the warning signal themselves (checkpoint at the next step boundary, exit 3,
dodo/train/loop.py). The batch script then runs, once per allocation:

    python -m dodo.cluster.continuation slurm|lsf RUN_DIR EXIT_CODE

which decides from the launcher's exit code and the run directory (never from sacct, which
fails where accounting is off) and acts through the scheduler's BatchBackend (requeue hook):
`scontrol requeue` (Slurm), `brequeue` or a chained `bsub -w "ended(<id>)"` (LSF,
cluster.lsf_continuation). Requeues are counted in
job/requeues.jsonl; cluster.max_requeues caps them per submission (`dodo submit RUN` starts
a new submission), and a run at the cap stops cleanly, saying why and how to go on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from dodo.cluster.backend import JobRecord
from dodo.exitcodes import (EXIT_COMPLETED, EXIT_DIVERGED, EXIT_FAILED, EXIT_HUNG, EXIT_STOPPED, EXIT_USAGE,
                            RESUMABLE)
from dodo.rundir import RunDir



def requeues_file(run: RunDir) -> Path:
    return run.job / "requeues.jsonl"


def cancel_marker(run: RunDir) -> Path:
    return run.job / "cancelled"


def requeue_log(run: RunDir) -> list[dict]:
    try:
        lines = requeues_file(run).read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # a line cut by a crash mid-write: skip it, keep the others
            entry = None
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def requeues_this_submission(run: RunDir) -> int:
    record = JobRecord.load(run)
    since = record.submitted if record else 0.0
    return sum(1 for r in requeue_log(run) if r.get("time", 0) >= since)


@dataclass(frozen=True)
class Decision:
    action: str  # "done" | "cancelled" | "requeue" | "restart" (a requeue after a crash) | "stop" | "fail"
    message: str


def restarts_this_submission(run: RunDir) -> int:
    record = JobRecord.load(run)
    since = record.submitted if record else 0.0
    return sum(1 for r in requeue_log(run) if r.get("time", 0) >= since and r.get("restart"))


def decide(run: RunDir, code: int, max_requeues: int, max_restarts: int = 0) -> Decision:
    """Pure: what the batch shell should do after the launcher exited with `code`."""
    status = run.status()
    step, total = status.get("step", 0), status.get("total_steps", "?")
    if cancel_marker(run).exists():
        return Decision("cancelled", "the run was cancelled (dodo cancel); not requeued")
    if status.get("state") == "completed":
        return Decision("done", f"completed at step {step}/{total}")
    # "stopped" is written by rank 0 after its checkpoint in this very allocation (it sets
    # "running" when it starts), so it is trusted even where the launcher's exit code is not.
    if code in RESUMABLE or status.get("state") == "stopped":
        done = requeues_this_submission(run)
        if done >= max_requeues:
            return Decision("stop", f"stopped at step {step}/{total}: cluster.max_requeues={max_requeues} "
                            f"reached ({done} requeues in this submission); continue it with "
                            f"`dodo submit {run.path}`, or raise cluster.max_requeues")
        reason = status.get("reason") or f"ranks exited with status {code}"
        return Decision("requeue", f"requeue {done + 1} of at most {max_requeues} at step {step}/{total} "
                        f"({reason})")
    if code == 0:
        return Decision("fail", f"the ranks exited 0 but the run is {status.get('state', 'unknown')!r}, "
                        "not completed; see the rank logs")
    # A crash or a hang (the per-rank watchdog exits 75, dodo/cluster/watchdog.py): retried from the
    # last checkpoint by a requeue, up to cluster.max_restarts; a divergence or a refusal is not.
    if code not in (EXIT_DIVERGED, EXIT_USAGE) and status.get("state") != "failed":
        done = restarts_this_submission(run)
        if done < max_restarts:
            what = "a rank hung" if code == EXIT_HUNG else f"the ranks exited with status {code}"
            return Decision("restart", f"{what} at step {step}/{total}; restart {done + 1} of at most "
                            f"{max_restarts} (cluster.max_restarts) from the last checkpoint, by requeue")
    return Decision("fail", f"the ranks exited with status {code} at step {step}/{total}; not requeued "
                    f"(a crash is not a preemption); see {run.logs}/rank_*.log, fix the cause and "
                    f"continue with `dodo submit {run.path}`")


def cluster_settings(run: RunDir) -> dict:
    """The run's resolved cluster section, read plainly: it was validated at submit, and a
    schema that changed since must not strand a run between two allocations."""
    try:
        data = yaml.safe_load(run.config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        data = {}
    section = data.get("cluster") if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def main(argv: list[str] | None = None) -> int:
    scheduler, run_dir, code_text = (argv if argv is not None else sys.argv[1:])[:3]
    run = RunDir.open(run_dir)
    cluster = cluster_settings(run)
    code = int(code_text)
    decision = decide(run, code, int(cluster.get("max_requeues", 10)), int(cluster.get("max_restarts", 2)))
    print(f"dodo: allocation ended (launcher exit {code}): {decision.message}", flush=True)
    if decision.action == "done":
        return EXIT_COMPLETED
    if decision.action == "cancelled":
        run.update_status(state="cancelled")
        return EXIT_COMPLETED
    if decision.action == "stop":
        run.update_status(state="stopped", reason=decision.message)
        return EXIT_STOPPED
    if decision.action == "fail":
        run.update_status(state="failed", exit_code=code, reason=decision.message)
        return EXIT_FAILED
    return _requeue(run, cluster, scheduler, decision.message, restart=decision.action == "restart")


def _requeue(run: RunDir, cluster: dict, scheduler: str, message: str, restart: bool = False) -> int:
    from dodo.cluster.backend import get_backend

    backend = get_backend(scheduler)  # a BatchBackend: slurm | lsf
    job_id = backend.current_job_id(os.environ)
    entry = {"time": time.time(), "job_id": job_id, "step": run.status().get("step", 0),
             "reason": message if restart else run.status().get("reason", ""), "scheduler": scheduler,
             "restart": restart}
    # Record first: `scontrol requeue` / `brequeue` end this very shell.
    with open(requeues_file(run), "a") as f:
        f.write(json.dumps(entry) + "\n")
    total = len(requeue_log(run))
    run.update_status(state="requeued", requeues=total, reason=message,
                      **({"restarts": restarts_this_submission(run)} if restart else {}))
    return backend.requeue(run, cluster, job_id)


if __name__ == "__main__":
    sys.exit(main())
