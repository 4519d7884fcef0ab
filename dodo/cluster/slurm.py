"""The Slurm backend: an sbatch script from the cluster profile, ranks under srun.

dodo renders its own sbatch script (a pure function, pinned by golden files) instead of
submitit's pickled-callable path, for three reasons seen on a real Slurm 22.05:
  - the checkpoint must happen at a step boundary that all ranks agree on; submitit calls
    `checkpoint()` inside rank 0's signal handler;
  - submitit reads job state only from sacct, which fails where accounting is off: the state
    stays UNKNOWN. dodo asks squeue, then scontrol, then the run directory;
  - the script in job/slurm.sbatch is readable and can be resubmitted by hand with sbatch.
The conventions are submitit's: `--signal=USR2@<lead>`, `--open-mode=append`, requeue with
`scontrol requeue` (the job keeps its id), arrays with `--array=0-N%P`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from dodo.cluster.batch import BatchBackend, ScriptPaths, environment_block, launch_block, run_tool
from dodo.config.schema import JobConfig

# States in which the job may still run (squeue's long names, also scontrol's JobState).
ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
         "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}
# srun waits this long for the other ranks once one has exited, then ends the step: a
# crashed rank must not leave the others hanging in a collective until the time limit.
STEP_GRACE_S = 60


def render_sbatch(cfg: JobConfig, paths: ScriptPaths) -> str:
    """The batch script for one run, or a job array with one element per run directory."""
    c = cfg.cluster
    array = len(paths.runs) > 1
    out = f"{paths.job_dir}/slurm-%A_%a.out" if array else f"{paths.job_dir}/slurm-%j.out"
    opts = [f"--job-name={cfg.name}", f"--nodes={c.nodes}", f"--ntasks-per-node={c.tasks_per_node}",
            f"--cpus-per-task={c.cores_per_task}", f"--time={c.time_limit_min}",
            f"--signal=USR2@{c.signal_lead_s}", "--requeue", "--open-mode=append", f"--output={out}"]
    if array:
        limit = f"%{c.array_parallel}" if c.array_parallel else ""
        opts.append(f"--array=0-{len(paths.runs) - 1}{limit}")
    if c.gpus_per_task:
        opts.append(f"--gpus-per-node={c.tasks_per_node * c.gpus_per_task}")
    for flag, value in (("partition", c.partition), ("account", c.account), ("qos", c.qos),
                        ("constraint", c.constraint), ("mem", c.memory)):
        if value:
            opts.append(f"--{flag}={value}")
    opts += list(c.directives)
    header = [
        "#!/bin/bash",
        f"# dodo: {cfg.name}, cluster profile {c.profile or '(none)'}; rendered by `dodo submit`.",
        "# Resubmit by hand with: sbatch <this file>",
    ] + [f"#SBATCH {o}" for o in opts]
    launcher = f"srun --wait={STEP_GRACE_S}"
    return ("\n".join(header) + "\n\n"
            + environment_block(c, paths, "SLURM_ARRAY_TASK_ID", 0) + "\n\n"
            + launch_block(launcher, "slurm", paths))


class SlurmBackend(BatchBackend):
    name = "slurm"
    script_name = "slurm.sbatch"
    submit_tool, cancel_tool = "sbatch", "scancel"
    plan_command = "sbatch job/slurm.sbatch"
    display, client_hint = "Slurm", "the Slurm client is not installed"
    alive_states = frozenset(ALIVE)

    def render(self, cfg: JobConfig, paths: ScriptPaths) -> str:
        return render_sbatch(cfg, paths)

    def submit_command(self, script: Path) -> tuple[list[str], Path | None]:
        return ["sbatch", "--parsable", str(script)], None

    def exclude_options(self, hosts: list[str]) -> list[str]:
        return [f"--exclude={','.join(hosts)}"]

    def job_id_from(self, proc: subprocess.CompletedProcess) -> str | None:
        return proc.stdout.strip().split(";")[0] or None  # --parsable: "<id>[;<cluster>]"

    def element_id(self, job_id: str, index: int) -> str:
        return f"{job_id}_{index}"

    def query_state(self, job_id: str) -> str | None:
        """squeue, else scontrol (both work without accounting); None when Slurm cannot say."""
        if shutil.which("squeue") is None:
            return None
        proc = run_tool(["squeue", "-h", "-j", job_id, "-o", "%T"], timeout=20)
        states = proc.stdout.split() if proc.returncode == 0 else []
        if states:
            return states[0]
        proc = run_tool(["scontrol", "show", "job", "-o", job_id], timeout=20)
        found = re.search(r"JobState=(\S+)", proc.stdout)
        return found[1] if found else "GONE"  # the controller forgot it (MinJobAge)

    def requeue_command(self, cluster: dict, job_id: str) -> list[str] | None:
        return ["scontrol", "requeue", job_id]  # the job keeps its id

    def current_job_id(self, env: Mapping[str, str]) -> str:
        return env.get("SLURM_JOB_ID", "")  # an array task's own id: requeues only that task

    def refusal_hint(self, proc: subprocess.CompletedProcess, cfg: JobConfig) -> str:
        return _hint(proc, cfg)


def _hint(proc, cfg: JobConfig) -> str:
    said = (proc.stderr + proc.stdout).lower()
    c = cfg.cluster
    if "partition" in said:
        parts = run_tool(["sinfo", "-h", "-o", "%P"], timeout=20).stdout.split() if shutil.which("sinfo") else []
        listed = f" (this cluster has: {', '.join(parts)})" if parts else " (`sinfo -s` lists them)"
        return f"set cluster.partition to a partition that exists{listed}; it is {c.partition!r}"
    if "account" in said:
        return f"set cluster.account to one of your accounts; it is {c.account!r}"
    if "qos" in said:
        return f"set cluster.qos to a QOS you may use; it is {c.qos!r}"
    if "time limit" in said:
        return f"lower cluster.time_limit_min ({c.time_limit_min}) to the partition's limit"
    if "node configuration" in said or "more processors" in said or "memory" in said:
        return (f"the partition has no nodes this large: lower cluster.nodes ({c.nodes}), "
                f"tasks_per_node ({c.tasks_per_node}), cpus_per_task ({c.cores_per_task}), "
                f"gpus_per_task ({c.gpus_per_task}) or memory ({c.memory or 'unset'})")
    return ("check the cluster settings against the site (`dodo submit JOB --dry-run` prints the "
            "script); " + shlex.quote("sbatch --test-only job/slurm.sbatch") + " shows what Slurm would do")
