"""Faults on 2 real local ranks: a hung rank (SIGSTOP), a crashed rank (SIGKILL), and signals to
the launcher itself (TERM): detected, stacks dumped, retried to completion, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import TINY, metrics, run_dirs

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
JOB = str(Path(__file__).parents[1] / "jobs/demo.yaml")
# Tiny allowances so that a hang is seen within seconds (startup covers imports on a busy machine).
FAST = ["cluster.hang_timeout_s.startup=120", "cluster.hang_timeout_s.step=4",
        "cluster.hang_timeout_s.eval=120", "cluster.hang_timeout_s.checkpoint=60"]


def start(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "OMPI_"))}
    return subprocess.Popen([sys.executable, "-m", "dodo", "submit", JOB, *TINY, *overrides,
                             f"runs_dir={tmp_path}/runs"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_beat(tmp_path: Path, rank: int, step: int, timeout: float = 240) -> tuple[Path, dict]:
    """The run directory and `rank`'s heartbeat once it reports `step` or later."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for run in run_dirs(tmp_path / "runs", "demo") if (tmp_path / "runs" / "demo").exists() else []:
            try:
                beat = json.loads((run / "job/heartbeat" / f"rank_{rank}.json").read_text())
            except (OSError, ValueError):
                continue
            if beat["phase"] == "step" and beat["step"] >= step:
                return run, beat
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never reached step {step}")


def ranks_of(run: Path) -> list[psutil.Process]:
    """Every live process whose command line names the run directory (ranks, supervisors)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if str(run) in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_sigstop_hang_is_detected_dumped_and_retried(tmp_path: Path):
    proc = start(tmp_path, "train.steps=150", "train.save_every=20", "train.log_every=20", *FAST)
    run, beat = wait_for_beat(tmp_path, rank=1, step=30)
    stopped_at = time.time()
    os.kill(beat["pid"], signal.SIGSTOP)
    while not (run / "job/faults.jsonl").exists():
        assert time.time() - stopped_at < 60, "hang not detected"
        time.sleep(0.1)
    latency = time.time() - stopped_at
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    (fault,) = [json.loads(line) for line in (run / "job/faults.jsonl").read_text().splitlines()]
    assert fault["kind"] == "hang" and fault["rank"] == 1 and fault["host"] == beat["host"]
    assert 4 <= latency < 4 + 10, latency  # the step allowance, plus polling and a busy machine
    stacks = (run / "job/stacks/rank_1.txt").read_text()
    assert "watchdog: stacks of rank 1" in stacks and "most recent call first" in stacks
    assert "dodo/train/loop.py" in stacks  # faulthandler's dump of the continued rank
    assert "restart 1/2 from the last checkpoint" in err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["restarts"] == 1
    assert sorted({r["step"] for r in metrics(run) if "train.loss" in r})[-1] == 150
    print(f"hang detection latency {latency:.1f} s (step allowance 4 s)")


def test_sigkill_crash_restarts_to_completion(tmp_path: Path):
    proc = start(tmp_path, "train.steps=200", "train.save_every=20", "train.log_every=20", *FAST)
    run, beat = wait_for_beat(tmp_path, rank=1, step=25)
    os.kill(beat["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    faults = [json.loads(line) for line in (run / "job/faults.jsonl").read_text().splitlines()]
    assert [(f["kind"], f["rank"], f["exit_code"]) for f in faults] == [("crash", 1, -9)]
    assert faults[0]["host"] == beat["host"]
    assert "rank 1 on" in err and "killed by SIGKILL; restart 1/2" in err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["restarts"] == 1
    segments = [json.loads(line) for line in (run / "job/segments.jsonl").read_text().splitlines()]
    assert [s["attempt"] for s in segments] == [0, 1]
    assert segments[0]["how"].startswith("ended abruptly") and segments[1]["how"] == "completed"
    assert segments[1]["start_step"] >= 20 and segments[1]["start_step"] % 20 == 0  # the last checkpoint
    assert segments[1]["end_step"] == 200
    shown = subprocess.run([sys.executable, "-m", "dodo", "status", str(run)], capture_output=True, text=True).stdout
    assert "restarts: 1" in shown and f"excluded hosts (next batch submission): {beat['host']}" in shown


@pytest.mark.parametrize("sig", [signal.SIGTERM])  # HUP takes the same path (FORWARDED)
def test_signal_to_the_launcher_leaves_no_rank_behind(tmp_path: Path, sig: int):
    proc = start(tmp_path, "train.steps=2000", "train.save_every=1000")
    run, _ = wait_for_beat(tmp_path, rank=0, step=5)
    assert len(ranks_of(run)) >= 2
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 3, out[-3000:] + err[-3000:]  # checkpointed and stopped: resumable
    assert ranks_of(run) == []
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and signal.Signals(sig).name[3:] in status["reason"]
    assert (run / "checkpoints" / "latest").exists()


def test_sigterm_while_ranks_start_leaves_none(tmp_path: Path):
    proc = start(tmp_path, "train.steps=2000")
    while not list((tmp_path / "runs").glob("demo/*/job/backend.json")):
        time.sleep(0.02)
    (run,) = run_dirs(tmp_path / "runs", "demo")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=180)
    time.sleep(1)
    assert ranks_of(run) == []


def test_sigkill_of_the_launcher_takes_its_ranks_down(tmp_path: Path):
    proc = start(tmp_path, "train.steps=2000", "train.save_every=1000")
    run, _ = wait_for_beat(tmp_path, rank=0, step=3)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.time() + 20
    while ranks_of(run) and time.time() < deadline:
        time.sleep(0.2)
    assert ranks_of(run) == []  # PR_SET_PDEATHSIG
