"""The LSF backend end to end under FAKE LSF commands (hpc/testcluster/fake-lsf/).

There is no LSF here. bsub/bjobs/bkill/brequeue are imitations that run the rendered batch
script locally; jsrun is `mpirun -np N` (real Open MPI, whose OMPI_COMM_WORLD_* variables are
the ones Spectrum MPI sets under jsrun). The golden bsub scripts are in test_slurm_scripts.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, dodo, run_dirs

FAKE = REPO / "hpc" / "testcluster" / "fake-lsf"
DEMO = str(REPO / "jobs" / "demo.yaml")
# The Summit profile, shrunk to this machine: 2 CPU ranks on one "node".
ON_THIS_MACHINE = ["cluster.project=TEST", "cluster.nodes=1", "cluster.tasks_per_node=2",
                   "cluster.gpus_per_task=0", "cluster.cpus_per_task=1", "cluster.threads_per_task=1",
                   "cluster.setup=[]"]


@pytest.fixture
def fake_lsf(tmp_path: Path) -> dict[str, str]:
    if shutil.which("mpirun") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("mpirun is not on PATH; CI must install openmpi-bin")
        pytest.skip("mpirun is not on PATH (install openmpi-bin)")
    return {"PATH": f"{FAKE}:{os.environ['PATH']}", "FAKE_LSF_DIR": str(tmp_path / "lsf-state")}


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def wait_for(what: str, predicate, timeout: float, run: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    outs = "".join(p.read_text() for p in sorted((run / "job").glob("lsf-*.out")))
    raise AssertionError(f"timed out waiting for {what}; status {status(run)}\n{outs[-3000:]}")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fake_lsf_run_continues_across_a_warning_signal(fake_lsf, tmp_path: Path):
    out = dodo("submit", DEMO, *TINY, "train.steps=60", "train.save_every=30", f"runs_dir={tmp_path}/runs",
               *ON_THIS_MACHINE, "--cluster", "summit", cwd=tmp_path, env=fake_lsf)
    first = out.stdout.split("lsf job ")[1].split()[0]
    (run,) = run_dirs(tmp_path / "runs", "demo")
    script = (run / "job/lsf.bsub").read_text()
    assert "#BSUB -P TEST" in script and "jsrun -n 2 -a 1 -g 0 -c 1 -r 2 --bind packed:1" in script
    wait_for("step 5", lambda: status(run).get("step", 0) >= 5, 120, run)
    # What LSF's -wa USR2 does before the run limit, sent by hand: bkill -s USR2.
    subprocess.run(["bkill", "-s", "USR2", first], check=True, env={**os.environ, **fake_lsf})
    wait_for("completion", lambda: status(run).get("state") in ("completed", "failed"), 240, run)
    s = status(run)
    assert s["state"] == "completed" and s["step"] == 60 and s["world_size"] == 2, s
    record = json.loads((run / "job/backend.json").read_text())
    chain = record["details"]["chain"]
    assert len(chain) == 2 and chain[0] == first and record["job_id"] == chain[1]
    requeues = [json.loads(l) for l in (run / "job/requeues.jsonl").read_text().splitlines()]
    assert len(requeues) == 1 and requeues[0]["job_id"] == first
    out = (run / f"job/lsf-{first}.out").read_text()
    assert f"follow-up job {chain[1]} waits for job {first} to end" in out
    for rank in (0, 1):
        log = (run / f"job/logs/rank_{rank}.log").read_text()
        assert f"rank {rank} on node" in log and f"job {chain[1]}" in log
    assert f"resumed from {run}/checkpoints/step_{requeues[0]['step']:08d}" in \
        (run / "job/logs/rank_0.log").read_text()

    def bjobs() -> list[str]:
        return subprocess.run(["bjobs", "-o", "jobid stat", "-noheader", first, chain[1]], capture_output=True,
                              text=True, env={**os.environ, **fake_lsf}).stdout.split()

    wait_for("the follow-up job to end", lambda: bjobs()[-1] != "RUN", 60, run)
    assert bjobs() == [first, "DONE", chain[1], "DONE"]
    row = [l for l in dodo("status", str(run), cwd=tmp_path).stdout.splitlines() if run.name in l][0]
    assert row.split()[1:5] == ["lsf", chain[1], "completed", "60/60"] and row.split()[6] == "1"


def test_bsub_refusal_shows_lsf_message_and_leaves_nothing(fake_lsf, tmp_path: Path):
    out = dodo("submit", DEMO, *TINY, f"runs_dir={tmp_path}/runs", *ON_THIS_MACHINE, "cluster.queue=nosuch",
               "--cluster", "summit", cwd=tmp_path, env=fake_lsf, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "bsub refused the job: nosuch: No such queue. Job not submitted." in out.stderr
    assert "set cluster.queue" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_bsub_is_a_clear_error(tmp_path: Path):
    out = dodo("submit", DEMO, *TINY, f"runs_dir={tmp_path}/runs", *ON_THIS_MACHINE, "--cluster", "summit",
               cwd=tmp_path, env={"PATH": "/nonexistent"}, check=False)
    assert out.returncode == 2 and "bsub is not on PATH" in out.stderr
    assert not (tmp_path / "runs").exists()
