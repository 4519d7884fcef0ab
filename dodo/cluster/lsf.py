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
import time
from pathlib import Path

from dodo.cluster.backend import Backend, BackendError, JobRecord
from dodo.cluster.batch import ScriptPaths, environment_block, launch_block, run_tool, tool_message
from dodo.config.schema import JobConfig
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


class LsfBackend(Backend):
    name = "lsf"

    def launch_plan(self, cfg: JobConfig, run_path: str) -> str:
        paths = ScriptPaths.for_runs(cfg.cluster, [run_path], f"{run_path}/job")
        return f"bsub < job/lsf.bsub, which reads:\n{render_bsub(cfg, paths)}"

    def preflight(self, cfg: JobConfig) -> None:
        _require("bsub")

    def submit(self, run: RunDir, cfg: JobConfig, foreground: bool) -> tuple[JobRecord, int]:
        (record,) = self.submit_array([run], cfg, run.job)
        return record, 0

    def submit_array(self, runs: list[RunDir], cfg: JobConfig, job_dir: Path) -> list[JobRecord]:
        _require("bsub")
        # Each run keeps its own single-job script: continuations resubmit that one.
        for run in runs:
            single = ScriptPaths.for_runs(cfg.cluster, [str(run.path)], str(run.job))
            (run.job / "lsf.bsub").write_text(render_bsub(cfg, single))
        script = job_dir / "lsf.bsub"
        if len(runs) > 1:
            paths = ScriptPaths.for_runs(cfg.cluster, [str(r.path) for r in runs], str(job_dir))
            script.write_text(render_bsub(cfg, paths))
        proc = run_tool(["bsub"], stdin_path=script)
        found = re.search(r"Job <(\d+)>", proc.stdout)
        if proc.returncode != 0 or not found:
            raise BackendError(f"bsub refused the job: {tool_message(proc)}; {_hint(proc, cfg)}")
        job_id, now = found[1], time.time()
        records = []
        for i, run in enumerate(runs):
            rid = f"{job_id}[{i + 1}]" if len(runs) > 1 else job_id
            record = JobRecord("lsf", rid, now, {"script": str(script), "array_job": job_id})
            record.save(run)
            run.update_status(state="queued", backend="lsf", job_id=rid)
            records.append(record)
        return records

    def is_alive(self, record: JobRecord) -> bool:
        state = self.scheduler_state(record)
        return state is None or state in ALIVE

    def scheduler_state(self, record: JobRecord) -> str | None:
        if shutil.which("bjobs") is None:
            return None
        proc = run_tool(["bjobs", "-o", "jobid stat", "-noheader", record.job_id], timeout=20)
        fields = proc.stdout.split()
        return fields[1] if proc.returncode == 0 and len(fields) >= 2 else "GONE"

    def cancel(self, record: JobRecord) -> None:
        _require("bkill")
        proc = run_tool(["bkill", record.job_id])
        if proc.returncode != 0:
            raise BackendError(f"bkill {record.job_id} failed: {tool_message(proc)}")


def _quote(text: str) -> str:
    return f'"{text}"' if re.search(r"[\s\[%]", text) else text


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        raise BackendError(f"{tool} is not on PATH: this is not an LSF login node (or LSF is not "
                           f"loaded: `module load lsf`); submit from the cluster's login node, or "
                           f"run here with --cluster local")


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
