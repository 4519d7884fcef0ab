"""The scheduler interface: one small class per backend (local, slurm, lsf).

A backend renders a launch plan (pure, for --dry-run and the run's job/ folder), submits a
run directory, and answers liveness and cancel for what it submitted. The record it returns
is kept in job/backend.json, so `dodo status` and `dodo cancel` work from any shell.
"""

from __future__ import annotations

import abc
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from dodo.config.schema import JobConfig
from dodo.rundir import RunDir, read_json, write_json_atomic


@dataclass
class JobRecord:
    backend: str
    job_id: str
    submitted: float
    details: dict[str, Any] = field(default_factory=dict)  # backend-specific: pids, script paths

    def save(self, run: RunDir) -> None:
        write_json_atomic(run.backend_file, asdict(self))

    @classmethod
    def load(cls, run: RunDir) -> "JobRecord | None":
        """None when the run was never submitted, or its record is damaged (status says so)."""
        data = read_json(run.backend_file)
        try:
            return cls(**data) if isinstance(data, dict) and data else None
        except TypeError:  # keys of another version, or an edited file
            return None


class Backend(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def launch_plan(self, cfg: JobConfig, run_path: str) -> str:
        """Human-readable description of what submit would run (no side effects)."""

    @abc.abstractmethod
    def submit(self, run: RunDir, cfg: JobConfig, foreground: bool) -> tuple[JobRecord, int]:
        """Start the run. Returns its record and an exit status (0 when detached)."""

    @abc.abstractmethod
    def is_alive(self, record: JobRecord) -> bool: ...

    @abc.abstractmethod
    def cancel(self, record: JobRecord) -> None: ...

    def preflight(self, cfg: JobConfig) -> None:
        """Raise BackendError when this machine cannot submit at all (before anything is written)."""

    def scheduler_state(self, record: JobRecord) -> str | None:
        """The scheduler's own word on the job (e.g. Slurm's TIMEOUT), for `dodo status`."""
        return None


class BackendError(Exception):
    """A submission the backend could not make; the message says what to change."""


def detect_backend() -> str:
    """`--cluster auto`: the scheduler whose submit command is on PATH, else local."""
    if shutil.which("sbatch"):
        return "slurm"
    if shutil.which("bsub"):
        return "lsf"
    return "local"


def get_backend(name: str) -> Backend:
    from dodo.cluster.local import LocalBackend
    from dodo.cluster.lsf import LsfBackend
    from dodo.cluster.slurm import SlurmBackend

    backends: dict[str, type[Backend]] = {"local": LocalBackend, "slurm": SlurmBackend, "lsf": LsfBackend}
    if name not in backends:
        raise BackendError(f"no scheduler backend {name!r}; use one of {', '.join(backends)} "
                           "(cluster.backend)")
    return backends[name]()
