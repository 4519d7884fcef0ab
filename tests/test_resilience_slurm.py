"""A crashed rank on the two-node Slurm test cluster (hpc/testcluster): its per-rank watchdog
(hpc/launch/rank.sh -> dodo.cluster.watchdog supervise) records the host, the batch shell's
continuation requeues the job (cluster.max_restarts), and the run resumes to completion."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import metrics
from test_slurm import finished, slurm_cluster, status, submit, wait_for  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.multiprocess]


def test_sigkill_of_a_rank_is_restarted_by_requeue_and_the_host_recorded(tmp_path: Path):
    run, job_id = submit(tmp_path, "train.steps=150", "train.save_every=20", "train.log_every=10")
    beat_file = run / "job/heartbeat/rank_1.json"

    def beat():
        try:
            b = json.loads(beat_file.read_text())
        except (OSError, ValueError):
            return None
        return b if b["phase"] == "step" and b["step"] >= 25 else None

    b = wait_for("rank 1 at step 25", beat, 240, run)
    os.kill(b["pid"], signal.SIGKILL)  # the virtual nodes share this machine's process table
    wait_for("the restart", lambda: (run / "job/requeues.jsonl").exists(), 180, run)
    final = finished(run, job_id, 420)
    assert final["state"] == "completed", final
    faults = [json.loads(line) for line in (run / "job/faults.jsonl").read_text().splitlines()]
    assert faults[0]["kind"] == "crash" and faults[0]["rank"] == 1 and faults[0]["host"] == b["host"]
    (requeue,) = [json.loads(line) for line in (run / "job/requeues.jsonl").read_text().splitlines()]
    assert requeue["restart"] and "restart 1 of at most 2" in requeue["reason"]
    assert max(r["step"] for r in metrics(run) if "train.loss" in r) == 150
    segments = [json.loads(line) for line in (run / "job/segments.jsonl").read_text().splitlines()]
    assert len(segments) == 2 and segments[1]["job_id"] == job_id and segments[1]["restart_count"] == "1"
    assert segments[1]["how"] == "completed" and segments[0]["how"].startswith("ended abruptly")


def test_sigstop_hang_is_ended_by_the_rank_watchdog_and_retried(tmp_path: Path):
    run, job_id = submit(tmp_path, "train.steps=150", "train.save_every=20", "train.log_every=10",
                         "cluster.hang_timeout_s.step=5")
    beat_file = run / "job/heartbeat/rank_1.json"

    def beat():
        try:
            b = json.loads(beat_file.read_text())
        except (OSError, ValueError):
            return None
        return b if b["phase"] == "step" and b["step"] >= 25 else None

    b = wait_for("rank 1 at step 25", beat, 240, run)
    stopped = time.time()
    os.kill(b["pid"], signal.SIGSTOP)
    wait_for("the hang record", lambda: (run / "job/faults.jsonl").exists(), 60, run)
    latency = time.time() - stopped
    final = finished(run, job_id, 420)
    assert final["state"] == "completed", final
    faults = [json.loads(line) for line in (run / "job/faults.jsonl").read_text().splitlines()]
    blamed = [(f["rank"], f["host"]) for f in faults if f["kind"] == "hang" and f["blame"]]
    assert blamed == [(1, b["host"])], faults  # rank 0 went silent too, but waiting on rank 1
    assert "most recent call first" in (run / "job/stacks/rank_1.txt").read_text()
    assert max(r["step"] for r in metrics(run) if "train.loss" in r) == 150
    assert latency < 5 + 10, latency
    print(f"Slurm hang detection latency {latency:.1f} s (step allowance 5 s)")
