"""Submitting a chain (dodo/cluster/chain.py): scheduler dependencies, the plan in job/submit.sh,
and the local backend's in-order run that does not start a stage whose inputs failed."""

from __future__ import annotations

import re
import shlex
from typing import Any

from dodo.cluster.chain import Chain
from dodo.config.schema import JobConfig
from dodo.rundir import RunDir, read_json, write_json_atomic


def blocked_reason(dep_run: RunDir, dep: str, state: str) -> str:
    log = dep_run.rank_log(0)
    said = dep_run.status().get("reason")
    return (f"not run: stage {dep} ended {state}" + (f" ({' '.join(str(said).split())[:160]})" if said else "")
            + f"; its log: {log}")


def dependency_options(backend: str, deps: list[tuple[str, str]]) -> list[str]:
    """Submit options that make a job wait for ``deps`` [(job id, job name)] to succeed."""
    if not deps:
        return []
    if backend == "slurm":
        return ["--dependency=afterok:" + ":".join(job_id for job_id, _ in deps), "--kill-on-invalid-dep=yes"]
    if backend == "lsf":
        return ["-w", " && ".join(f'done("{name}")' for _, name in deps), "-ti"]
    raise ValueError(f"no scheduler dependencies for backend {backend}")


def render_plan(chain: Chain, backend: Any) -> str:
    """The submissions `dodo chain` makes, as a shell script a user could run by hand (job/submit.sh)."""
    var = {i.dir: re.sub(r"\W", "_", i.dir) for i in chain.instances}
    lines = ["#!/bin/bash", f"# dodo chain {chain.name}: the submissions `dodo chain` made, in order; rendered",
             "# by dodo/cluster/chain_submit.py. Each stage waits for the stages whose run directories it takes.",
             "set -euo pipefail"]
    for inst in chain.instances:
        script = chain.run(inst).job / backend.script_name
        deps = [(f"${{{var[d]}}}", next(i.job_name for i in chain.instances if i.dir == d)) for d in inst.deps]
        opts = " ".join(shlex.quote(o) if not o.startswith("--dependency") else o
                        for o in dependency_options(backend.name, deps))
        if backend.name == "slurm":
            lines.append(f"{var[inst.dir]}=$(sbatch --parsable {opts + ' ' if opts else ''}{script})"
                         f"  # {inst.job_name}")
        else:
            lines.append(f"bsub {opts + ' ' if opts else ''}< {script}  # -J {inst.job_name}")
    return "\n".join(lines) + "\n"


def submit_batch(chain: Chain, configs: list[JobConfig], backend: Any) -> list[str]:
    """Each stage in order, waiting on its inputs; returns the job ids. On a refusal the jobs
    already submitted are cancelled (BackendError propagates; the caller removes the folder)."""
    from dodo.cluster.backend import BackendError

    ids: dict[str, str] = {}
    names = {i.dir: i.job_name for i in chain.instances}
    (chain.path / "job" / "submit.sh").write_text(render_plan(chain, backend))
    try:
        for inst, cfg in zip(chain.instances, configs):
            deps = [(ids[d], names[d]) for d in inst.deps]
            (record,) = backend.submit_array([chain.run(inst)], cfg, chain.run(inst).job,
                                             extra=dependency_options(backend.name, deps))
            ids[inst.dir] = record.job_id
    except BackendError:
        for job_id in ids.values():
            from dodo.cluster.batch import run_tool

            run_tool([backend.cancel_tool, job_id])
        raise
    data = read_json(chain.file, {})
    data.update(backend=backend.name, job_ids=ids)
    write_json_atomic(chain.file, data)
    return [ids[i.dir] for i in chain.instances]


def run_local(chain: Chain, configs: list[JobConfig], backend: Any) -> tuple[int, list[str]]:
    """Stages in order in the foreground; a stage whose inputs did not complete is not started,
    and none after a stage stopped on request (a signal: it checkpointed and can resume).
    Returns (the worst exit status, one line per stage that failed or was not run)."""
    data = read_json(chain.file, {})
    data.update(backend="local")
    write_json_atomic(chain.file, data)
    by_dir = {i.dir: i for i in chain.instances}
    worst, problems, stopped = 0, [], ""
    for inst, cfg in zip(chain.instances, configs):
        run = chain.run(inst)
        if stopped:  # Ctrl-C / a TERM stops the chain, not only the stage it reached
            run.update_status(state="blocked", reason=f"not run: {stopped}")
            problems.append(f"stage {inst.dir}: not run: {stopped}")
            continue
        bad = [d for d in inst.deps if chain.run(by_dir[d]).status().get("state") != "completed"]
        if bad:
            dep_run = chain.run(by_dir[bad[0]])
            reason = blocked_reason(dep_run, bad[0], dep_run.status().get("state", "unknown"))
            run.update_status(state="blocked", reason=reason)
            problems.append(f"stage {inst.dir}: {reason}")
            worst = max(worst, 1)
            continue
        print(f"dodo: chain {chain.name}: stage {inst.dir} ({run.path})", flush=True)
        _, code = backend.submit(run, cfg, foreground=True)
        status = run.status()
        if status.get("state") == "stopped":
            stopped = (f"the chain stopped at stage {inst.dir} ({status.get('reason', 'a signal')}); "
                       f"`dodo submit {run.path}` resumes that stage")
        if status.get("state") != "completed":
            problems.append(f"stage {inst.dir} ended {status.get('state', 'unknown')} (exit {code}); "
                            f"its log: {run.rank_log(0)}")
            worst = max(worst, code or 1)
    return worst, problems
