"""The local backend: one process per rank on this host (gloo on CPU), no scheduler.

Ranks run in their own session so that Ctrl-C reaches only this launcher, which forwards it
as SIGINT: every rank then checkpoints at the next step boundary and exits (status 3). A rank
that fails brings the others down, since they would wait for it in a collective forever.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dodo.cluster.backend import Backend, JobRecord
from dodo.config.schema import JobConfig
from dodo.exitcodes import EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED
from dodo.rundir import RunDir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world: int, port: int, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMIX_", "JSM_"))}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
               DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), PYTHONUNBUFFERED="1")
    return env


class LocalBackend(Backend):
    name = "local"

    def launch_plan(self, cfg: JobConfig, run_path: str) -> str:
        world = cfg.cluster.world_size
        return (f"local: {world} processes on this host (RANK=0..{world - 1}, gloo, "
                f"MASTER_ADDR=127.0.0.1, {cfg.cluster.threads_per_task} thread(s) each), each running:\n"
                f"  {sys.executable} -m dodo run {run_path}\n"
                f"  logs: {run_path}/job/logs/rank_<r>.log")

    def submit(self, run: RunDir, cfg: JobConfig, foreground: bool) -> tuple[JobRecord, int]:
        world, port = cfg.cluster.world_size, free_port()
        procs = []
        for rank in range(world):
            log = open(run.rank_log(rank), "ab")
            env = rank_environment(rank, world, port, cfg.cluster.threads_per_task)
            if rank == 0 and foreground and sys.stdout.isatty():
                env["DODO_PROGRESS"] = "bar"
            procs.append(subprocess.Popen([sys.executable, "-m", "dodo", "run", str(run.path)],
                                          stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
            log.close()
        record = JobRecord("local", f"local-{procs[0].pid}", time.time(),
                           {"pids": [p.pid for p in procs], "host": socket.gethostname()})
        record.save(run)
        run.update_status(state="running", backend="local", job_id=record.job_id)
        if not foreground:
            return record, 0
        return record, self._supervise(run, procs)

    def _supervise(self, run: RunDir, procs: list[subprocess.Popen]) -> int:
        """Stream rank 0's log, forward Ctrl-C, and take everyone down if one rank fails."""
        interrupts = 0

        def on_interrupt(signum, frame):
            nonlocal interrupts
            interrupts += 1
            sig = signal.SIGINT if interrupts == 1 else signal.SIGKILL
            if interrupts == 1:
                print("\ndodo: stopping after a checkpoint (Ctrl-C again to kill)", file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, sig)

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            with open(run.rank_log(0), "rb") as log:
                log.seek(0, os.SEEK_END)
                while True:
                    _copy_new(log)
                    codes = [p.poll() for p in procs]
                    failed = [r for r, c in enumerate(codes) if c not in (None, EXIT_COMPLETED, EXIT_STOPPED)]
                    if failed:
                        return self._fail(run, procs, failed[0], codes[failed[0]])
                    if all(c is not None for c in codes):
                        _copy_new(log)
                        return EXIT_STOPPED if EXIT_STOPPED in codes else EXIT_COMPLETED
                    time.sleep(0.2)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _fail(self, run: RunDir, procs: list[subprocess.Popen], rank: int, code: int) -> int:
        time.sleep(2)  # let the other ranks report their own error first
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        tail = run.rank_log(rank).read_text(errors="replace").splitlines()[-25:]
        run.update_status(state="failed", failed_rank=rank, exit_code=code)
        print(f"\ndodo: rank {rank} exited with status {code}; last lines of {run.rank_log(rank)}:\n  "
              + "\n  ".join(tail), file=sys.stderr, flush=True)
        return EXIT_FAILED

    def is_alive(self, record: JobRecord) -> bool:
        return any(_pid_alive(pid) for pid in record.details.get("pids", []))

    def cancel(self, record: JobRecord) -> None:
        for pid in record.details.get("pids", []):
            if _pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by a detached launcher) is not alive.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def _copy_new(log) -> None:
    data = log.read()
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
