"""What the Slurm and LSF batch scripts share: paths, the environment block, the epilogue.

The script renderers (slurm.py, lsf.py) are pure functions of the config and these paths,
so that golden files can pin what a site gets (tests/golden/, delete a file to re-record).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dodo.cluster.config import ClusterConfig

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
