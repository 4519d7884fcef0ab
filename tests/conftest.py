"""Shared helpers: run the real `dodo` command in a subprocess, with tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET once, when it is first imported, and any test module that
# imports dodo imports it (through dodo_kernels): set it here, before test collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]

# A small, fast variant of jobs/demo.yaml for end-to-end tests on 2 CPU processes.
TINY = [
    "model.lm.d_model=32", "model.lm.n_head=2", "model.lm.n_positions=40",
    "model.image_encoder.hidden=32", "model.image_encoder.n_layer=1",
    "data.num_train=512", "data.num_eval=32", "train.micro_batch=8",
    "train.log_every=1", "train.eval_every=1000", "train.caption_samples=4", "train.warmup_steps=2",
]


def dodo(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m dodo ARGS` as a researcher would; output captured as text."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "OMPI_"))}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "dodo", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode not in (0, 3):
        raise AssertionError(f"dodo {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def run_dirs(runs: Path, name: str) -> list[Path]:
    return sorted(p for p in (runs / name).glob("*") if not p.name.startswith("."))


def metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch directory with the repo's jobs/ and configs/ visible by relative path."""
    (tmp_path / "jobs").symlink_to(REPO / "jobs")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    return tmp_path


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> dict[str, Path]:
    """The real-format caches (tests/data_helpers.py real_caches), built once per session and
    shared by every end-to-end test on real data (test_real_data_e2e, test_real_families_e2e)."""
    from data_helpers import real_caches

    return real_caches(tmp_path_factory.mktemp("real"))
