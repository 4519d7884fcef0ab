"""What the Slurm and LSF backends share: script paths, the environment block, the epilogue, and
the BatchBackend base class (submit, record, state, cancel, requeue; schedulers supply hooks).

The script renderers (slurm.py, lsf.py) are pure functions of the config and these paths,
so that golden files can pin what a site gets (tests/golden/, delete a file to re-record).
"""

from __future__ import annotations

import abc
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from dodo.cluster.backend import Backend, BackendError, JobRecord
from dodo.cluster.config import ClusterConfig
from dodo.config.schema import JobConfig
from dodo.exitcodes import EXIT_COMPLETED, EXIT_STOPPED
from dodo.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
RANK_WRAPPER = REPO / "hpc" / "launch" / "rank.sh"


@dataclass(frozen=True)
class ScriptPaths:
    """Absolute paths baked into a batch script (compute nodes see the same file system)."""

    python: str  # the interpreter that has dodo installed
    wrapper: str  # hpc/launch/rank.sh
    runs: tuple[str, ...]  # one run directory, or one per array element
    job_dir: str  # where the scheduler's own output goes

    @classmethod
    def for_runs(cls, cluster: ClusterConfig, runs: list[str], job_dir: str) -> "ScriptPaths":
        return cls(cluster.python or sys.executable, str(RANK_WRAPPER), tuple(runs), job_dir)


def environment_block(cluster: ClusterConfig, paths: ScriptPaths, array_index: str, base: int) -> str:
    """Site setup lines, the rank environment, and RUN (picked by the array index for sweeps)."""
    lines = []
    if cluster.setup:
        lines += ["# site setup (cluster.setup)"] + list(cluster.setup)
    lines.append("set -u  # after the site setup: module scripts often read unset variables")
    env = [f"OMP_NUM_THREADS={cluster.threads_per_task}", "PYTHONUNBUFFERED=1"]
    if cluster.gpus_per_task == 0:
        env.append("DS_ACCELERATOR=cpu")
    lines.append("export " + " ".join(env))
    if len(paths.runs) == 1:
        lines.append(f"RUN={shlex.quote(paths.runs[0])}")
    else:
        lines.append("RUNS=(")
        lines += [f"  {shlex.quote(r)}" for r in paths.runs]
        lines.append(")")
        offset = f" - {base}" if base else ""
        lines.append(f"RUN=${{RUNS[${array_index}{offset}]}}")
    return "\n".join(lines)


def launch_block(launcher: str, scheduler: str, paths: ScriptPaths) -> str:
    """The ranks, then the continuation decision (dodo/cluster/continuation.py)."""
    py = shlex.quote(paths.python)
    return (
        "# Every rank gets the warning signal (USR2) itself, checkpoints at the next step\n"
        "# boundary and exits 3; this shell only waits, then decides what follows.\n"
        "trap 'echo \"dodo: warning signal: the ranks checkpoint and stop\"' USR2\n"
        f"{launcher} {shlex.quote(paths.wrapper)} \"$RUN\" {py} -m dodo run \"$RUN\"\n"
        "code=$?\n"
        f"exec {py} -m dodo.cluster.continuation {scheduler} \"$RUN\" \"$code\"\n")


def run_tool(cmd: list[str], stdin_path: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """A scheduler command; its own message is kept for the error the user sees."""
    stdin = open(stdin_path) if stdin_path else subprocess.DEVNULL
    try:
        return subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, timeout=timeout)
    finally:
        if stdin_path:
            stdin.close()


def tool_message(proc: subprocess.CompletedProcess) -> str:
    text = " ".join(((proc.stderr or "") + " " + (proc.stdout or "")).split())
    return text or f"exit status {proc.returncode}"


class BatchBackend(Backend):
    """What Slurm and LSF share: write the batch script, submit it, record the job, ask its state,
    cancel it, and requeue it from the batch shell (dodo/cluster/continuation.py). A scheduler
    supplies only its hooks: the script, the command lines, and how to read a job id and a state.
    (The shape of submitit's Executor: `_make_submission_file_text`, `_make_submission_command`,
    `_get_job_id_from_submission_command`.)
    """

    script_name: ClassVar[str]  # job/<script_name>: the rendered batch script
    submit_tool: ClassVar[str]  # sbatch | bsub: must be on PATH to submit at all
    cancel_tool: ClassVar[str]  # scancel | bkill
    plan_command: ClassVar[str]  # how --dry-run shows the submission: "sbatch job/slurm.sbatch"
    display: ClassVar[str]  # "Slurm" | "LSF", for messages
    client_hint: ClassVar[str]  # what is missing when its tools are not on PATH
    alive_states: ClassVar[frozenset[str]]  # the scheduler's states in which the job may still run

    # ---- hooks
    @abc.abstractmethod
    def render(self, cfg: JobConfig, paths: ScriptPaths) -> str:
        """The batch script (a pure function: golden files pin it)."""

    @abc.abstractmethod
    def submit_command(self, script: Path) -> tuple[list[str], Path | None]:
        """The command that submits `script`, and the file it reads on stdin (bsub < script)."""

    @abc.abstractmethod
    def job_id_from(self, proc: subprocess.CompletedProcess) -> str | None:
        """The job id in the submit command's output; None when it is not there."""

    @abc.abstractmethod
    def element_id(self, job_id: str, index: int) -> str:
        """The id of array element `index` (0-based) of job `job_id`."""

    @abc.abstractmethod
    def query_state(self, job_id: str) -> str | None:
        """The scheduler's state of the job, "GONE" when it forgot it, None when it cannot say."""

    @abc.abstractmethod
    def requeue_command(self, cluster: dict, job_id: str) -> list[str] | None:
        """Put the job back in the queue from its batch shell; None: `chain` does it instead."""

    @abc.abstractmethod
    def current_job_id(self, env: Mapping[str, str]) -> str:
        """This allocation's own job id (an array element's), from the batch shell's environment."""

    @abc.abstractmethod
    def refusal_hint(self, proc: subprocess.CompletedProcess, cfg: JobConfig) -> str:
        """Which key to change when the scheduler refused the job."""

    def exclude_options(self, hosts: list[str]) -> list[str]:
        """Submit options that keep the job off `hosts` (blamed for a hang or crash, watchdog.py)."""
        return []

    def chain(self, run: RunDir, job_id: str) -> int:
        """A follow-up job instead of a requeue (LSF's `bsub -w ended(<id>)`)."""
        raise NotImplementedError(f"{self.name} requeues; it does not chain")

    def write_scripts(self, runs: list[RunDir], cfg: JobConfig, job_dir: Path) -> Path:
        """Write the script(s); returns the one to submit (an array's when there are several runs)."""
        paths = ScriptPaths.for_runs(cfg.cluster, [str(r.path) for r in runs], str(job_dir))
        script = Path(job_dir) / self.script_name
        script.write_text(self.render(cfg, paths))
        return script

    def require(self, tool: str) -> None:
        if shutil.which(tool) is None:
            raise BackendError(f"{tool} is not on PATH: this is not a {self.display} login node (or "
                               f"{self.client_hint}); submit from the cluster's login node, or run here "
                               f"with --cluster local")

    # ---- shared
    def launch_plan(self, cfg: JobConfig, run_path: str) -> str:
        paths = ScriptPaths.for_runs(cfg.cluster, [run_path], f"{run_path}/job")
        return f"{self.plan_command}, which reads:\n{self.render(cfg, paths)}"

    def preflight(self, cfg: JobConfig) -> None:
        self.require(self.submit_tool)

    def submit(self, run: RunDir, cfg: JobConfig, foreground: bool) -> tuple[JobRecord, int]:
        (record,) = self.submit_array([run], cfg, run.job)
        return record, 0

    def submit_array(self, runs: list[RunDir], cfg: JobConfig, job_dir: Path,
                     extra: list[str] = ()) -> list[JobRecord]:
        """One submission for all runs (an array when there are several); one record per run.
        ``extra``: more submit options, e.g. a chain stage's dependency (dodo/cluster/chain.py)."""
        self.require(self.submit_tool)
        script = self.write_scripts(runs, cfg, Path(job_dir))
        command, stdin = self.submit_command(script)
        from dodo.cluster.watchdog import blamed_hosts

        hosts = sorted({h for run in runs for h in blamed_hosts(run)})
        if hosts:  # on the command line: it overrides the script's own directives
            command = command[:1] + self.exclude_options(hosts) + command[1:]
            print(f"dodo: excluding hosts blamed for a hang or crash of this run: {', '.join(hosts)}", flush=True)
        command = command[:1] + list(extra) + command[1:]
        proc = run_tool(command, stdin_path=stdin)
        job_id = self.job_id_from(proc) if proc.returncode == 0 else None
        if job_id is None:
            raise BackendError(f"{self.submit_tool} refused the job: {tool_message(proc)}; "
                               f"{self.refusal_hint(proc, cfg)}")
        now, records = time.time(), []
        for i, run in enumerate(runs):
            rid = self.element_id(job_id, i) if len(runs) > 1 else job_id
            record = JobRecord(self.name, rid, now, {"script": str(script), "array_job": job_id})
            record.save(run)
            run.update_status(state="queued", backend=self.name, job_id=rid)
            records.append(record)
        return records

    def is_alive(self, record: JobRecord) -> bool:
        state = self.scheduler_state(record)
        return state is None or state in self.alive_states  # unknown here: trust the run directory

    def scheduler_state(self, record: JobRecord) -> str | None:
        return self.query_state(record.job_id)

    def cancel(self, record: JobRecord) -> None:
        self.require(self.cancel_tool)
        proc = run_tool([self.cancel_tool, record.job_id])
        if proc.returncode != 0:
            raise BackendError(f"{self.cancel_tool} {record.job_id} failed: {tool_message(proc)}")

    def requeue(self, run: RunDir, cluster: dict, job_id: str) -> int:
        """From the batch shell, after the requeue was recorded: requeue (or chain) this job."""
        command = self.requeue_command(cluster, job_id)
        if command is None:
            return self.chain(run, job_id)
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode == 0:
            time.sleep(30)  # the scheduler ends this allocation now; don't let the shell report first
            return EXIT_COMPLETED
        return requeue_failed(run, " ".join(command), proc)


def requeue_failed(run: RunDir, command: str, proc: subprocess.CompletedProcess) -> int:
    said = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
    message = (f"`{command}` failed: {said}; the checkpoint is kept: continue with "
               f"`dodo submit {run.path}`")
    print(f"dodo: {message}", file=sys.stderr, flush=True)
    run.update_status(state="stopped", reason=message)
    return EXIT_STOPPED
