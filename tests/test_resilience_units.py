"""The fault machinery without training: heartbeat ages per phase, blame, host exclusion,
and the batch shell's decision to restart after a crash or a hang (fast, no ranks)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from dodo.cluster.backend import JobRecord
from dodo.cluster.continuation import decide, requeues_file
from dodo.cluster.lsf import LsfBackend
from dodo.cluster.slurm import SlurmBackend
from dodo.cluster.watchdog import Watchdog, blamed_hosts, proc_state, record_fault
from dodo.exitcodes import EXIT_DIVERGED, EXIT_HUNG
from dodo.rundir import RunDir
from dodo.train.heartbeat import Heartbeat

TIMEOUTS = {"startup": 5.0, "step": 1.0, "eval": 3.0, "checkpoint": 3.0}


def make_run(tmp_path: Path) -> RunDir:
    return RunDir.create(tmp_path / "runs", "demo", "name: demo\n")


def test_silence_is_measured_against_the_phase_allowance(tmp_path: Path):
    run = make_run(tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        beat = Heartbeat(run, 0)
        beat.pid = sleeper.pid  # a heartbeat on behalf of the watched process
        beat.beat("checkpoint", 7, force=True)
        dog = Watchdog(run, TIMEOUTS, {0: sleeper.pid, 1: 999999}, "hostA", launched=time.time())
        time.sleep(1.3)
        assert dog.silent() == []  # checkpoint allows 3 s; rank 1 has no beat yet: startup, 5 s
        beat.beat("step", 8, force=True)
        time.sleep(1.3)
        (silent,) = dog.silent()
        assert (silent.rank, silent.phase, silent.step, silent.allowance_s) == (0, "step", 8, 1.0)
        beat.close()  # "done" is never silent
        assert dog.silent() == []
    finally:
        sleeper.kill()


def test_blame_goes_to_the_stopped_rank(tmp_path: Path):
    run = make_run(tmp_path)
    a, b = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    try:
        b.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        assert proc_state(b.pid) == "T"
        dog = Watchdog(run, TIMEOUTS, {0: a.pid, 1: b.pid}, "hostA", launched=time.time() - 10)
        silent = dog.silent()
        assert len(silent) == 2 and dog.blame(silent).rank == 1
    finally:
        for p in (a, b):
            p.kill()


def test_blamed_hosts_become_scheduler_exclusions(tmp_path: Path):
    run = make_run(tmp_path)
    record_fault(run, "hang", rank=1, host="n2")
    record_fault(run, "crash", rank=0, host="n7", blame=False)  # a consequence, not a cause
    record_fault(run, "crash", rank=3, host="n5")
    assert blamed_hosts(run) == ["n2", "n5"]
    assert SlurmBackend().exclude_options(blamed_hosts(run)) == ["--exclude=n2,n5"]
    assert LsfBackend().exclude_options(blamed_hosts(run)) == ["-R", "select[hname!=n2 && hname!=n5]"]


def test_crash_or_hang_is_restarted_by_requeue_up_to_max_restarts(tmp_path: Path):
    run = make_run(tmp_path)
    JobRecord("slurm", "42", time.time() - 5).save(run)
    run.update_status(state="running", step=30, total_steps=100)
    assert decide(run, EXIT_HUNG, 10, 2).action == "restart"
    assert "a rank hung at step 30/100; restart 1 of at most 2" in decide(run, EXIT_HUNG, 10, 2).message
    assert decide(run, 137, 10, 2).action == "restart"
    for _ in range(2):
        with open(requeues_file(run), "a") as f:
            f.write(json.dumps({"time": time.time(), "restart": True}) + "\n")
    assert decide(run, 137, 10, 2).action == "fail"  # max_restarts used up
    assert decide(run, EXIT_DIVERGED, 10, 2).action == "fail"  # would only diverge again
