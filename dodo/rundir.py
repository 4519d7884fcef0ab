"""The run directory: everything one run owns, in one place.

runs/<name>/<id>/
  config.yaml      the resolved config, itself a valid job file
  job/             launch plan, backend record, per-rank logs (job/logs/rank_<r>.log)
  checkpoints/     step_<n>/ (published atomically) and `latest`
  metrics.jsonl    rank 0 metrics; tb/ TensorBoard events; plots/ PNGs
  status.json      state, step, last loss (rank 0 / the launcher keep it current)
  summary.json     final metrics
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        # mkstemp makes the file 0600; run directories and caches on a shared file system must
        # stay readable by the group, as an ordinary open() under the user's umask would make them.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def job(self) -> Path:
        return self.path / "job"

    @property
    def logs(self) -> Path:
        return self.job / "logs"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank_{rank}.log"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def backend_file(self) -> Path:
        return self.job / "backend.json"

    def status(self) -> dict[str, Any]:
        return read_json(self.status_file, default={})

    def update_status(self, **fields: Any) -> dict[str, Any]:
        """The one writer of status.json (launchers, rank 0, the batch continuation, dodo cancel):
        read-merge-write under an exclusive lock, so that two writers never drop each other's keys."""
        import fcntl

        with open(self.path / ".status.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            status = {**self.status(), **fields, "updated": time.time()}
            write_json_atomic(self.status_file, status)
        return status

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        run = cls(Path(path).resolve())
        if not run.config.is_file():
            raise FileNotFoundError(f"{path} is not a dodo run directory (no config.yaml); "
                                    "pass a directory printed by `dodo submit`, e.g. runs/<name>/<id>")
        return run

    @classmethod
    def create(cls, runs_dir: str | os.PathLike, name: str, config_text: str) -> "RunDir":
        """Create runs/<name>/<id>/ fully formed, or not at all (built aside, then renamed)."""
        parent = Path(runs_dir).resolve() / name
        parent.mkdir(parents=True, exist_ok=True)
        run_id = time.strftime("%Y-%m-%d_%H%M%S") + "_" + secrets.token_hex(2)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{run_id}."))
        try:
            (staging / "config.yaml").write_text(config_text)
            for sub in ("job/logs", "checkpoints", "plots"):
                (staging / sub).mkdir(parents=True)
            now = time.time()
            write_json_atomic(staging / "status.json", {"state": "created", "created": now, "updated": now})
            final = parent / run_id
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls(final)

    def remove(self) -> None:
        """Delete a run that never started (its submission failed)."""
        shutil.rmtree(self.path, ignore_errors=True)
