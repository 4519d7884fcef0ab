"""Provenance: which code, environment and nodes produced each stretch of a run.

At submit, `snapshot_code` copies the source of the installed `dodo` and `dodo_kernels`
packages into job/code/ (plus job/code/git.json and git.diff when they come from a git
checkout). Every allocation then runs from that copy: the local launcher and the batch
scripts put job/code first on PYTHONPATH, so a requeue a week later does not pick up whatever
the checkout holds by then. Pure-Python copies only: compiled extensions and third-party
packages come from the environment, which each segment records (pip freeze).

Each allocation (and each in-allocation restart) is a segment in job/segments.jsonl, written by
rank 0: the installed distributions (importlib.metadata: the pip freeze, without running pip),
the node list, the scheduler's variables (SLURM_*, LSB_*, ...), the start and end step and how
it ended. A segment whose rank 0 was killed has no end; the next one marks it "ended abruptly".

Torch-free (runs in `dodo submit`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dodo.rundir import RunDir, write_atomic, write_json_atomic

PACKAGES = ("dodo", "dodo_kernels")
SCHEDULER_PREFIXES = ("SLURM_", "LSB_", "LSF_", "JSM_", "PMIX_", "OMPI_COMM_WORLD", "PBS_")
SCHEDULER_SKIP = ("SLURM_JOB_NODELIST_RAW",)


def code_dir(run: RunDir) -> Path:
    return run.job / "code"


def code_pythonpath(run: RunDir) -> str | None:
    """The folder to put first on PYTHONPATH, when the run has a snapshot."""
    return str(code_dir(run)) if (code_dir(run) / "dodo" / "__init__.py").is_file() else None


def _git(repo: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def snapshot_code(run: RunDir) -> float | None:
    """Copy the packages' source into job/code/ (once per run); returns the seconds it took,
    None when the run already has a snapshot (a resume keeps the original code)."""
    out = code_dir(run)
    if out.exists():
        return None
    started = time.perf_counter()
    tmp = run.job / ".code.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sources: dict[str, str] = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        src = Path(list(spec.submodule_search_locations)[0])
        shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        sources[name] = str(src)
    info: dict[str, Any] = {"sources": sources, "python": sys.executable, "time": time.time()}
    repo = Path(sources.get("dodo", ".")).parent
    sha = _git(repo, "rev-parse", "HEAD")
    if sha:
        diff = _git(repo, "diff", "HEAD", "--", *[str(Path(s).relative_to(repo)) for s in sources.values()
                                                  if Path(s).is_relative_to(repo)]) or ""
        status = _git(repo, "status", "--porcelain", "--untracked-files=no") or ""
        info.update(git_sha=sha.strip(), git_dirty=bool(status.strip()), git_repo=str(repo))
        write_atomic(tmp / "git.diff", diff)
    info["snapshot_ms"] = round(1000 * (time.perf_counter() - started), 1)
    write_json_atomic(tmp / "code.json", info)
    tmp.rename(out)
    return time.perf_counter() - started


def segments_file(run: RunDir) -> Path:
    return run.job / "segments.jsonl"


def segments(run: RunDir) -> list[dict[str, Any]]:
    try:
        lines = segments_file(run).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _write_segments(run: RunDir, rows: list[dict[str, Any]]) -> None:
    write_atomic(segments_file(run), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def installed_distributions() -> list[str]:
    """`pip freeze` without pip: name==version of every distribution on sys.path (~10 ms)."""
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in found:
            found[name.lower()] = f"{name}=={dist.version}"
    return sorted(found.values(), key=str.lower)


def node_list() -> list[str]:
    """The allocation's hosts, as the scheduler names them (local: this host)."""
    if os.environ.get("SLURM_JOB_NODELIST"):
        return [os.environ["SLURM_JOB_NODELIST"]]
    rankfile = os.environ.get("LSB_DJOB_RANKFILE")
    if rankfile and Path(rankfile).is_file():
        hosts = [h.strip() for h in Path(rankfile).read_text().splitlines() if h.strip()][1:]  # first: launch node
        return list(dict.fromkeys(hosts))
    return [socket.gethostname()]


def begin_segment(run: RunDir, start_step: int, world_size: int) -> dict[str, Any]:
    """Rank 0, at start-up: append this allocation's segment (closing an abandoned one)."""
    rows = segments(run)
    for row in rows:
        if row.get("ended") is None:
            row["ended"], row["how"] = row.get("last_seen"), "ended abruptly (no end record: killed?)"
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(SCHEDULER_PREFIXES) and k not in SCHEDULER_SKIP}
    seg = {"index": len(rows), "started": time.time(), "ended": None, "start_step": start_step, "end_step": None,
           "how": None, "world_size": world_size, "nodes": node_list(), "host": socket.gethostname(),
           "attempt": int(os.environ.get("DODO_ATTEMPT", "0") or 0), "scheduler_env": env,
           "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("LSB_JOBID") or "",
           "restart_count": os.environ.get("SLURM_RESTART_COUNT", ""),
           "code": str(code_dir(run)) if code_dir(run).is_dir() else "",
           "dodo_source": str(Path(__file__).resolve().parents[1]),  # where this rank imported dodo from
           "python": sys.version.split()[0], "packages": installed_distributions()}
    _write_segments(run, rows + [seg])
    return seg


def end_segment(run: RunDir, end_step: int, how: str) -> None:
    """Rank 0, at exit: fill in the end of the newest segment."""
    rows = segments(run)
    if rows:
        rows[-1].update(ended=time.time(), end_step=end_step, how=how)
        _write_segments(run, rows)


def describe_segments(run: RunDir) -> list[str]:
    """Lines for `dodo status RUN`."""
    lines = []
    for s in segments(run):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["started"]))
        steps = f"steps {s['start_step']}->{s['end_step'] if s['end_step'] is not None else '?'}"
        job = f" job {s['job_id']}" if s.get("job_id") else ""
        lines.append(f"  segment {s['index']}: {when}{job} on {', '.join(s['nodes'])}, {s['world_size']} ranks, "
                     f"{steps}, {s['how'] or 'running'} ({len(s.get('packages', []))} packages recorded)")
    return lines


def run_details(run: RunDir) -> list[str]:
    """`dodo status RUN`: restarts, faults and excluded hosts, the save budget, the segments."""
    from dodo.cluster.watchdog import blamed_hosts, faults_file, read_jsonl

    status, lines = run.status(), []
    faults = read_jsonl(faults_file(run))
    if faults or status.get("restarts"):
        lines.append(f"restarts: {status.get('restarts', 0)} in the last allocation; faults:")
        for f in faults[-10:]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f["time"]))
            what = (f"silent {f.get('silent_s')} s in phase {f.get('phase')} at step {f.get('step')}"
                    if f["kind"] == "hang" else f"exit status {f.get('exit_code')}")
            lines.append(f"  {when} {f['kind']}: rank {f.get('rank')} on {f.get('host')}, {what}")
        lines.append(f"excluded hosts (next batch submission): {', '.join(blamed_hosts(run)) or 'none'}")
    if status.get("save_warning"):
        lines.append(f"warning: {status['save_warning']}")
    segs = describe_segments(run)
    if segs:
        lines.append(f"segments ({segments_file(run)}):")
        lines += segs
    return lines
