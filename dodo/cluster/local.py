"""The local backend: one process per rank on this host (gloo on CPU), no scheduler.

A supervisor (in the `dodo submit` process, or a detached `python -m dodo.cluster.local RUN`)
starts the ranks, each in its own session so that Ctrl-C reaches only the supervisor, and:
  - forwards INT, TERM and HUP to every rank: each checkpoints at the next step boundary and
    exits (status 3); a second signal kills them. A signal during start-up ends the ranks
    started so far (nothing to save yet);
  - never leaves ranks behind: each rank asks the kernel to kill it when the supervisor dies,
    even by SIGKILL (prctl PR_SET_PDEATHSIG);
  - watches the ranks' heartbeats (dodo/cluster/watchdog.py): a rank silent past
    cluster.hang_timeout_s gets its stacks dumped and the attempt is ended;
  - retries a crashed or hung attempt from the last checkpoint, up to cluster.max_restarts.
    A rank that failed brings the others down first, since they would wait for it forever.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dodo.cluster.backend import Backend, JobRecord
from dodo.cluster.watchdog import Watchdog, dump_stacks, kill_tree, record_fault, timeouts_of
from dodo.config.schema import JobConfig
from dodo.exitcodes import EXIT_COMPLETED, EXIT_DIVERGED, EXIT_FAILED, EXIT_STOPPED, EXIT_USAGE
from dodo.rundir import RunDir

NO_RETRY = (EXIT_USAGE, EXIT_DIVERGED)  # a refusal or a divergence would only happen again
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world: int, port: int, threads: int, run_path: str | None = None,
                     attempt: int = 0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMIX_", "JSM_"))}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
               DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), PYTHONUNBUFFERED="1",
               DODO_ATTEMPT=str(attempt))
    code = Path(run_path or "") / "job" / "code"
    if run_path and (code / "dodo" / "__init__.py").is_file():  # the snapshot taken at submit
        env["PYTHONPATH"] = os.pathsep.join([str(code)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _die_with_parent(parent: int):
    def preexec() -> None:  # runs in the child between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)
    return preexec


class LocalBackend(Backend):
    name = "local"

    def launch_plan(self, cfg: JobConfig, run_path: str) -> str:
        world = cfg.cluster.world_size
        return (f"local: {world} processes on this host (RANK=0..{world - 1}, gloo, "
                f"MASTER_ADDR=127.0.0.1, {cfg.cluster.threads_per_task} thread(s) each), each running:\n"
                f"  {sys.executable} -m dodo run {run_path}\n"
                f"  logs: {run_path}/job/logs/rank_<r>.log; a supervisor forwards INT/TERM/HUP, watches "
                f"heartbeats and retries crashes (cluster.max_restarts={cfg.cluster.max_restarts})")

    def submit(self, run: RunDir, cfg: JobConfig, foreground: bool) -> tuple[JobRecord, int]:
        if foreground:
            return Supervisor(run, cfg, stream=True).supervise()
        log = open(run.logs / "launcher.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "dodo.cluster.local", str(run.path)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "DODO_SUPERVISOR_SUBMITTED": str(time.time())})
        log.close()
        record = JobRecord("local", f"local-{proc.pid}", time.time(),
                           {"pids": [proc.pid], "supervisor": proc.pid, "host": socket.gethostname()})
        record.save(run)
        run.update_status(state="running", backend="local", job_id=record.job_id)
        return record, 0

    def is_alive(self, record: JobRecord) -> bool:
        return any(_pid_alive(pid) for pid in record.details.get("pids", []))

    def cancel(self, record: JobRecord) -> None:
        kill_tree([pid for pid in record.details.get("pids", []) if _pid_alive(pid)])


class Supervisor:
    """One allocation of a local run: attempts of `world` ranks, until done or out of restarts."""

    def __init__(self, run: RunDir, cfg: JobConfig, stream: bool, job_id: str | None = None):
        self.run, self.cfg, self.stream = run, cfg, stream
        self.world = cfg.cluster.world_size
        self.host = socket.gethostname()
        self.job_id = job_id or f"local-{os.getpid()}"
        self.procs: list[subprocess.Popen] = []
        self.signals: list[int] = []

    # -- signals
    def _on_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)
        if len(self.signals) == 1:
            print(f"\ndodo: {signal.Signals(signum).name}: stopping after a checkpoint (again to kill)",
                  file=sys.stderr, flush=True)
            for p in self.procs:
                if p.poll() is None:
                    os.kill(p.pid, signum)  # the ranks handle INT, TERM and HUP alike (dodo/train/signals.py)
        else:
            kill_tree([p.pid for p in self.procs if p.poll() is None])

    def supervise(self) -> tuple[JobRecord, int]:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED}
        try:
            return self._attempts()
        finally:
            kill_tree([p.pid for p in self.procs if p.poll() is None])  # never leave a rank behind
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _record(self) -> JobRecord:
        record = JobRecord("local", self.job_id, time.time(),
                           {"pids": [os.getpid()] + [p.pid for p in self.procs], "supervisor": os.getpid(),
                            "host": self.host})
        record.save(self.run)
        return record

    def _launch(self, attempt: int) -> bool:
        """Start the ranks; False when a signal came meanwhile (those started are ended)."""
        port, self.procs = free_port(), []
        for rank in range(self.world):
            if self.signals:
                break
            env = rank_environment(rank, self.world, port, self.cfg.cluster.threads_per_task,
                                   str(self.run.path), attempt)
            if rank == 0 and self.stream and sys.stdout.isatty():
                env["DODO_PROGRESS"] = "bar"
            with open(self.run.rank_log(rank), "ab") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "dodo", "run", str(self.run.path)], stdout=log,
                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                    preexec_fn=_die_with_parent(os.getpid())))
        if self.signals:
            kill_tree([p.pid for p in self.procs])
            for p in self.procs:
                p.wait()
            return False
        return True

    def _attempts(self) -> tuple[JobRecord, int]:
        restarts, max_restarts = 0, self.cfg.cluster.max_restarts
        record = self._record()
        self.run.update_status(state="running", backend="local", job_id=self.job_id)
        while True:
            if not self._launch(restarts):
                why = signal.Signals(self.signals[0]).name
                self.run.update_status(state="stopped", reason=f"{why} received while the ranks started")
                return self._record(), EXIT_STOPPED
            record = self._record()
            outcome, fault = self._watch()
            if outcome is not None:
                return record, outcome
            kill_tree([p.pid for p in self.procs])
            for p in self.procs:
                p.wait()
            code = fault.get("exit_code")
            if self.signals or code in NO_RETRY or restarts >= max_restarts:
                state = "stopped" if self.signals else "failed"
                if code not in NO_RETRY:  # a diverged or refusing rank 0 said why itself
                    self.run.update_status(state=state, failed_rank=fault.get("rank"), exit_code=code,
                                           reason=fault["message"], restarts=restarts)
                print(f"\ndodo: {fault['message']}" + ("" if restarts < max_restarts or code in NO_RETRY else
                      f"; cluster.max_restarts={max_restarts} used up")
                      + ("" if code in NO_RETRY else self._tail(fault.get("rank"))),
                      file=sys.stderr, flush=True)
                return record, code if code in NO_RETRY else EXIT_FAILED
            restarts += 1
            self.run.update_status(state="running", restarts=restarts, last_fault=fault["message"])
            print(f"\ndodo: {fault['message']}; restart {restarts}/{max_restarts} from the last checkpoint",
                  file=sys.stderr, flush=True)

    def _tail(self, rank: int | None) -> str:
        if rank is None:
            return ""
        tail = self.run.rank_log(rank).read_text(errors="replace").splitlines()[-25:]
        return f"; last lines of {self.run.rank_log(rank)}:\n  " + "\n  ".join(tail)

    def _watch(self) -> tuple[int | None, dict]:
        """Until the attempt ends: (exit status, {}) when it ended by itself, or (None, fault)."""
        dog = Watchdog(self.run, timeouts_of(self.cfg.cluster), {r: p.pid for r, p in enumerate(self.procs)},
                       self.host)
        log = open(self.run.rank_log(0), "rb")
        log.seek(0, os.SEEK_END)
        last_check = 0.0
        try:
            while True:
                if self.stream:
                    _copy_new(log)
                codes = [p.poll() for p in self.procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, EXIT_COMPLETED, EXIT_STOPPED)]
                if failed:
                    time.sleep(2)  # let the others report their own error first
                    codes = [p.poll() for p in self.procs]
                    rank = min(failed, key=lambda r: (codes[r] >= 0, r))  # killed by a signal first
                    code = codes[rank]
                    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
                    fault = {"rank": rank, "exit_code": code, "message": f"rank {rank} on {self.host} {how}"}
                    if code not in NO_RETRY and not self.signals:
                        record_fault(self.run, "crash", rank=rank, host=self.host, exit_code=code)
                    return None, fault
                if all(c is not None for c in codes):
                    if self.stream:
                        _copy_new(log)
                    return (EXIT_STOPPED if EXIT_STOPPED in codes else EXIT_COMPLETED), {}
                if time.time() - last_check >= 1.0 and not self.signals:
                    last_check = time.time()
                    silent = dog.silent()
                    if silent:
                        return None, self._hang(dog, silent)
                time.sleep(0.2)
        finally:
            log.close()

    def _hang(self, dog: Watchdog, silent) -> dict:
        s = dog.blame(silent)
        stacks = dump_stacks(self.run, {r: p.pid for r, p in enumerate(self.procs)})
        record_fault(self.run, "hang", rank=s.rank, host=s.host, phase=s.phase, step=s.step,
                     silent_s=round(s.silent_s, 1), allowance_s=s.allowance_s,
                     silent_ranks=[x.rank for x in silent])
        return {"rank": s.rank, "exit_code": None,
                "message": f"watchdog: {s.describe()}; stacks of every rank in {stacks}"}


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


def main(run_dir: str) -> int:
    """The detached supervisor (`dodo submit --detach`): the same as a foreground one, silent."""
    from dodo.config.resume import load_run_config

    run = RunDir.open(run_dir)
    record = JobRecord.load(run)
    _, code = Supervisor(run, load_run_config(run), stream=False,
                         job_id=record.job_id if record else None).supervise()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
