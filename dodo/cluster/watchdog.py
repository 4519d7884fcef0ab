"""Hang detection and fault records: the launcher side of dodo/train/heartbeat.py.

A rank is silent when its heartbeat (job/heartbeat/rank_<r>.json) is older than the allowance
of the phase it last reported (cluster.hang_timeout_s: startup, step, eval, checkpoint); before
its first beat of this attempt, the time since launch counts against `startup`. On a hang the
launcher dumps every rank's Python stacks (py-spy when installed, which reads even a stopped
process; else SIGCONT + SIGUSR1 to faulthandler), records the rank and host in job/faults.jsonl,
and ends the attempt so that it is retried from the last checkpoint (cluster.max_restarts).

When one rank hangs, the others soon block in its next collective and stop beating too, so
blame goes to the silent rank that is stopped (process state T) or dead, else to the lowest
step, else the oldest beat. Hosts blamed for a hang or a crash are excluded from the next
batch submission (dodo/cluster/slurm.py --exclude, lsf.py select[hname!=...]).

Torch-free: runs in the launcher and in the batch script's per-rank supervisor (`python -m
dodo.cluster.watchdog supervise RUN -- COMMAND...`, see hpc/launch/rank.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dodo.exitcodes import EXIT_HUNG  # 75: the watchdog ended the attempt
from dodo.rundir import RunDir


def faults_file(run: RunDir) -> Path:
    return run.job / "faults.jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: skip it
            pass
    return out


def record_fault(run: RunDir, kind: str, **fields: Any) -> dict[str, Any]:
    """Append one fault ({kind: hang|crash, rank, host, ...}) to job/faults.jsonl."""
    entry = {"time": time.time(), "kind": kind, **fields}
    run.job.mkdir(parents=True, exist_ok=True)
    with open(faults_file(run), "a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def blamed_hosts(run: RunDir) -> list[str]:
    """Hosts blamed for a hang or crash, in order of first blame; excluded from the next submission."""
    hosts: list[str] = []
    for fault in read_jsonl(faults_file(run)):
        host = fault.get("host") if fault.get("blame", True) else None
        if host and host not in hosts:
            hosts.append(host)
    return hosts


def read_beats(run: RunDir) -> dict[int, dict[str, Any]]:
    beats = {}
    for path in (run.job / "heartbeat").glob("rank_*.json"):
        try:
            beat = json.loads(path.read_text())
            beats[int(beat["rank"])] = beat
        except (OSError, ValueError, KeyError):
            continue  # being replaced, or foreign
    return beats


def proc_state(pid: int) -> str:
    """'R', 'S', 'T' (stopped), 'Z' ... from /proc; '' when gone or not on Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@dataclass
class Silent:
    rank: int
    host: str
    pid: int
    phase: str
    step: int
    silent_s: float
    allowance_s: float

    def describe(self) -> str:
        return (f"rank {self.rank} on {self.host} (pid {self.pid}) silent for {self.silent_s:.0f} s in phase "
                f"{self.phase} at step {self.step} (allowance {self.allowance_s:.0f} s)")


class Watchdog:
    """Watches the ranks of one attempt. `pids`: rank -> pid of this attempt (a beat from an
    earlier attempt's pid does not count as a sign of life)."""

    def __init__(self, run: RunDir, timeouts: dict[str, float], pids: dict[int, int], host: str,
                 launched: float | None = None):
        self.run, self.timeouts, self.pids, self.host = run, timeouts, pids, host
        self.launched = launched or time.time()

    def silent(self) -> list[Silent]:
        now, beats, found = time.time(), read_beats(self.run), []
        for rank, pid in self.pids.items():
            beat = beats.get(rank)
            if beat is None or beat.get("pid") != pid:
                beat = {"phase": "startup", "time": self.launched, "step": -1, "host": self.host}
            allowance = float(self.timeouts.get(beat["phase"], self.timeouts["step"]))
            if beat["phase"] != "done" and now - beat["time"] > allowance:
                found.append(Silent(rank, beat.get("host", self.host), pid, beat["phase"], beat.get("step", -1),
                                    now - beat["time"], allowance))
        return found

    def blame(self, silent: list[Silent]) -> Silent:
        """The rank that hung first (see the module docstring)."""
        def key(s: Silent) -> tuple:
            state = proc_state(s.pid)
            return (0 if state in ("T", "t", "Z", "") else 1, s.step, -s.silent_s)
        return min(silent, key=key)


def dump_stacks(run: RunDir, pids: dict[int, int], wait_s: float = 2.0) -> Path:
    """Every rank's Python stacks into job/stacks/ (rank_<r>.txt, appended); returns the folder."""
    out = run.job / "stacks"
    out.mkdir(parents=True, exist_ok=True)
    pyspy = shutil.which("py-spy")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for rank, pid in pids.items():
        with open(out / f"rank_{rank}.txt", "a") as f:
            f.write(f"\n=== dodo watchdog: stacks of rank {rank} (pid {pid}, state {proc_state(pid) or 'gone'}) "
                    f"at {stamp} ===\n")
        if pyspy:  # reads the process from outside: works on a stopped or wedged interpreter
            with open(out / f"rank_{rank}.txt", "a") as f:
                subprocess.run([pyspy, "dump", "--pid", str(pid)], stdout=f, stderr=subprocess.STDOUT, timeout=30)
            continue
        for sig in (signal.SIGCONT, signal.SIGUSR1):  # faulthandler cannot run in a stopped process
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
    if not pyspy:
        time.sleep(wait_s)  # the handlers write asynchronously
    return out


def kill_tree(pids: list[int]) -> None:
    """SIGKILL each rank's process group (ranks run in their own session) and the rank itself."""
    for pid in pids:
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass


def timeouts_of(cluster) -> dict[str, float]:
    h = cluster.hang_timeout_s
    return {"startup": h.startup, "step": h.step, "eval": h.eval, "checkpoint": h.checkpoint}


def supervise(run_dir: str, command: list[str]) -> int:
    """One rank under srun/jsrun: run it, forward the scheduler's signals, end it when it hangs.

    Exits with the rank's status, or EXIT_HUNG after dumping stacks and recording the fault; srun
    (--wait) then ends the other ranks and the batch script retries (cluster.max_restarts)."""
    from dodo.config.loader import load_job

    run = RunDir.open(run_dir)
    cfg = load_job(run.config)
    rank = int(os.environ.get("SLURM_PROCID") or os.environ.get("JSM_NAMESPACE_RANK")
               or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
    host = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    child = subprocess.Popen(command)
    forwarded: list[int] = []

    def forward(signum, frame) -> None:
        forwarded.append(signum)
        child.send_signal(signum)

    for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    dog = Watchdog(run, timeouts_of(cfg.cluster), {rank: child.pid}, host)
    while True:
        try:
            code = child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            if code < 0 and not forwarded:  # killed by a signal nobody sent on purpose: OOM, segfault
                record_fault(run, "crash", rank=rank, host=host, exit_code=code)
            return code if code >= 0 else 128 - code
        silent = dog.silent()
        if silent:
            s = silent[0]
            state = proc_state(child.pid)  # before the dump continues it (and the others end it)
            dump_stacks(run, {rank: child.pid})
            # Every rank's supervisor sees its rank go silent once one hangs (the others block in
            # its collective), and beats of a rank continued for its dump are not comparable. So a
            # supervisor blames its host only when its rank was stopped (or gone) at detection; a
            # wedge in a kernel (state R/D) is recorded unblamed: no host is excluded for it.
            blame = state in ("T", "t", "Z", "")
            record_fault(run, "hang", rank=rank, host=s.host, phase=s.phase, step=s.step, blame=blame,
                         silent_s=round(s.silent_s, 1), allowance_s=s.allowance_s)
            print(f"dodo: watchdog: {s.describe()}; stacks in {run.job / 'stacks'}; ending the attempt",
                  file=sys.stderr, flush=True)
            child.kill()
            child.wait()
            return EXIT_HUNG


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "supervise" or "--" not in sys.argv:
        print("usage: python -m dodo.cluster.watchdog supervise RUN_DIR -- COMMAND...", file=sys.stderr)
        sys.exit(2)
    split = sys.argv.index("--")
    sys.exit(supervise(sys.argv[2], sys.argv[split + 1:]))
