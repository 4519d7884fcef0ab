"""The LSF backend for Summit/Sierra-class sites: a bsub script, ranks under jsrun.

One rank per resource set: `jsrun -n <nodes * tasks_per_node> -a 1 -g <gpus_per_task>
-c <cores> -r <tasks_per_node> --bind packed:<cores>`; with the Summit profile that is one rank
per V100, 7 cores each. Rank discovery reads JSM_NAMESPACE_* / OMPI_COMM_WORLD_* and the
rendezvous host from LSB_DJOB_RANKFILE (dodo/cluster/env.py).

Continuation across allocations (cluster.lsf_continuation, docs/clusters.md):
  chain    (default) on the warning signal the ranks checkpoint, then the batch script submits
           a follow-up `bsub -w "ended(<id>)" < job/lsf.bsub`. It queues while this job still
           runs, so its wait overlaps the work; it is what Summit's users did. Not allowed in
           Summit's debug queue.
  requeue  `brequeue <id>`: the same job id goes back to PEND; it keeps its submit time.
No LSF was available to develop this: the scripts are pinned by golden files and run under
fake bsub/bjobs/bkill/brequeue/jsrun commands (hpc/testcluster/fake-lsf/) with mpirun.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from dodo.cluster.backend import JobRecord
from dodo.cluster.batch import (BatchBackend, ScriptPaths, environment_block, launch_block, requeue_failed,
                                run_tool)
from dodo.config.schema import JobConfig
from dodo.exitcodes import EXIT_COMPLETED
from dodo.rundir import RunDir

ALIVE = {"PEND", "RUN", "PSUSP", "USUSP", "SSUSP", "WAIT", "PROV"}


def jsrun_line(cfg: JobConfig) -> str:
    c = cfg.cluster
    cores = c.cores_per_task
    return (f"jsrun -n {c.nodes * c.tasks_per_node} -a 1 -g {c.gpus_per_task} -c {cores} "
            f"-r {c.tasks_per_node} --bind packed:{cores}")


def walltime(minutes: int) -> str:
    return f"{minutes // 60}:{minutes % 60:02d}"


def render_bsub(cfg: JobConfig, paths: ScriptPaths) -> str:
    """The batch script for one run, or a job array (1-based LSB_JOBINDEX) over several."""
    c = cfg.cluster
    array = len(paths.runs) > 1
    name = cfg.name
    if array:
        name += f"[1-{len(paths.runs)}]" + (f"%{c.array_parallel}" if c.array_parallel else "")
    out = f"{paths.job_dir}/lsf-%J_%I.out" if array else f"{paths.job_dir}/lsf-%J.out"
    opts = []
    if c.project:
        opts.append(f"-P {c.project}")
    if c.queue:
        opts.append(f"-q {c.queue}")
    opts += [f"-nnodes {c.nodes}", f"-W {walltime(c.time_limit_min)}", f"-J {_quote(name)}",
             f"-o {out}", f"-e {out}"]
    if c.alloc_flags:
        opts.append(f"-alloc_flags {_quote(c.alloc_flags)}")
    if c.signal_lead_s:
        # LSF counts the warning time in minutes: round the lead up, never down.
        opts += ["-wa USR2", f"-wt {max(1, math.ceil(c.signal_lead_s / 60))}"]
    opts += list(c.directives)
    header = [
        "#!/bin/bash",
        f"# dodo: {cfg.name}, cluster profile {c.profile or '(none)'}; rendered by `dodo submit`.",
        "# Resubmit by hand with: bsub < <this file>",
    ] + [f"#BSUB {o}" for o in opts]
    return ("\n".join(header) + "\n\n"
            + environment_block(c, paths, "LSB_JOBINDEX", 1) + "\n\n"
            + launch_block(jsrun_line(cfg), "lsf", paths))


class LsfBackend(BatchBackend):
    name = "lsf"
    script_name = "lsf.bsub"
    submit_tool, cancel_tool = "bsub", "bkill"
    plan_command = "bsub < job/lsf.bsub"
    display, client_hint = "LSF", "LSF is not loaded: `module load lsf`"
    alive_states = frozenset(ALIVE)

    def render(self, cfg: JobConfig, paths: ScriptPaths) -> str:
        return render_bsub(cfg, paths)

    def write_scripts(self, runs: list[RunDir], cfg: JobConfig, job_dir: Path) -> Path:
        # Each run keeps its own single-job script: continuations resubmit that one.
        for run in runs:
            single = ScriptPaths.for_runs(cfg.cluster, [str(run.path)], str(run.job))
            (run.job / self.script_name).write_text(render_bsub(cfg, single))
        if len(runs) == 1:
            return runs[0].job / self.script_name
        return super().write_scripts(runs, cfg, job_dir)

    def submit_command(self, script: Path) -> tuple[list[str], Path | None]:
        return ["bsub"], script

    def exclude_options(self, hosts: list[str]) -> list[str]:
        return ["-R", "select[" + " && ".join(f"hname!={h}" for h in hosts) + "]"]

    def job_id_from(self, proc: subprocess.CompletedProcess) -> str | None:
        found = re.search(r"Job <(\d+)>", proc.stdout)
        return found[1] if found else None

    def element_id(self, job_id: str, index: int) -> str:
        return f"{job_id}[{index + 1}]"  # LSF arrays are 1-based

    def query_state(self, job_id: str) -> str | None:
        if shutil.which("bjobs") is None:
            return None
        proc = run_tool(["bjobs", "-o", "jobid stat", "-noheader", job_id], timeout=20)
        fields = proc.stdout.split()
        return fields[1] if proc.returncode == 0 and len(fields) >= 2 else "GONE"

    def requeue_command(self, cluster: dict, job_id: str) -> list[str] | None:
        return ["brequeue", job_id] if cluster.get("lsf_continuation") == "requeue" else None

    def chain(self, run: RunDir, job_id: str) -> int:
        """A follow-up job that starts when this one has ended: `bsub -w "ended(<id>)" < lsf.bsub`."""
        script = run.job / self.script_name
        with open(script) as stdin:
            proc = subprocess.run(["bsub", "-w", f"ended({job_id})"], stdin=stdin, capture_output=True,
                                  text=True)
        new_id = self.job_id_from(proc) if proc.returncode == 0 else None
        if new_id is None:
            return requeue_failed(run, f'bsub -w "ended({job_id})" < {script}', proc)
        record = JobRecord.load(run)
        if record is not None:
            chain = record.details.setdefault("chain", [record.job_id])
            chain.append(new_id)
            record.job_id = new_id
            record.save(run)
        run.update_status(job_id=new_id)
        print(f"dodo: follow-up job {new_id} waits for job {job_id} to end", flush=True)
        return EXIT_COMPLETED

    def current_job_id(self, env: Mapping[str, str]) -> str:
        index = env.get("LSB_JOBINDEX", "0")
        return f"{env['LSB_JOBID']}[{index}]" if index not in ("", "0") else env.get("LSB_JOBID", "")

    def refusal_hint(self, proc: subprocess.CompletedProcess, cfg: JobConfig) -> str:
        return _hint(proc, cfg)


def _quote(text: str) -> str:
    return f'"{text}"' if re.search(r"[\s\[%]", text) else text


def _hint(proc, cfg: JobConfig) -> str:
    said = (proc.stderr + proc.stdout).lower()
    c = cfg.cluster
    if "queue" in said:
        return f"set cluster.queue to a queue that exists (`bqueues` lists them); it is {c.queue!r}"
    if "project" in said:
        return f"set cluster.project to your allocation; it is {c.project!r}"
    if "run limit" in said or "runlimit" in said:
        return f"lower cluster.time_limit_min ({c.time_limit_min}) to the queue's limit"
    return ("check the cluster settings against the site (`dodo submit JOB --dry-run` prints the "
            "script); " + shlex.quote("bqueues -l " + (c.queue or "<queue>")) + " shows the queue's limits")
