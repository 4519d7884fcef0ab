"""Start-up compiles nothing inside a rank, whatever `ninja` comes first on PATH."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import REPO, TINY, dodo, metrics, run_dirs


@pytest.mark.slow
@pytest.mark.multiprocess
def test_submit_reaches_step_1_without_compiling(tmp_path: Path):
    # A `ninja` that logs and fails comes first on PATH, and the extensions folder is empty: any
    # JIT build of a DeepSpeed op would run it (and fail the run).
    bin_dir, log = tmp_path / "bin", tmp_path / "ninja-calls.log"
    bin_dir.mkdir()
    ninja = bin_dir / "ninja"
    ninja.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexit 1\n")
    ninja.chmod(ninja.stat().st_mode | stat.S_IEXEC)
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TORCH_EXTENSIONS_DIR": str(ext)}
    dodo("submit", str(REPO / "jobs/demo.yaml"), *TINY, "train.steps=1", f"runs_dir={tmp_path}/runs",
         cwd=tmp_path, env=env)
    (run,) = run_dirs(tmp_path / "runs", "demo")
    assert [r["step"] for r in metrics(run) if "train.loss" in r] == [1]
    assert not log.exists(), f"ninja was called: {log.read_text()}"
    assert list(ext.iterdir()) == [], "something was built into TORCH_EXTENSIONS_DIR"
