"""Which checkpoints a run has published, read without torch.

Split out of dodo/train/checkpoint.py (which re-exports everything here) so that `dodo submit`
can check a resume against the newest checkpoint (its step and world size) before anything is
launched, without importing torch or DeepSpeed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dodo.rundir import RunDir, read_json

_TAG = re.compile(r"^step_(\d{8})$")
META = "dodo_meta.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    world_size: int

    @property
    def tag(self) -> str:
        return self.path.name


def published(run: RunDir) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first."""
    found = []
    for path in run.checkpoints.glob("step_*"):
        meta = read_json(path / META)
        if _TAG.match(path.name) and meta is not None:
            found.append(CheckpointInfo(path, meta["step"], meta["world_size"]))
    return sorted(found, key=lambda c: c.step)


def latest(run: RunDir) -> CheckpointInfo | None:
    done = published(run)
    return done[-1] if done else None
