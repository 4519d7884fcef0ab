"""dodo on a real Slurm: the two-node test cluster of hpc/testcluster/slurm-testcluster.sh.

`make test` starts it (as root). Where it is not running these tests are skipped with the
reason, except under CI=true, where that is a failure. Jobs are the TINY demo: 2 ranks, one
per virtual node (n1, n2), or 1 rank when two jobs share the cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, dodo, metrics, run_dirs

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.multiprocess]

STATUS_FILE = Path(os.environ.get("DODO_SLURM_STATUS", "/tmp/dodo-slurm-testcluster.status"))
DEMO = str(REPO / "jobs" / "demo.yaml")
STEPS = ["train.steps=60", "train.save_every=30"]


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    script = REPO / "hpc" / "testcluster" / "slurm-testcluster.sh"
    up = shutil.which("sinfo") and subprocess.run(["bash", str(script), "status"]).returncode == 0
    if not up:
        reason = STATUS_FILE.read_text().strip() if STATUS_FILE.exists() else \
            "not started (run `sudo hpc/testcluster/slurm-testcluster.sh start`, or `make test`)"
        message = f"the test Slurm cluster is not up: {reason}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def wait_for(what: str, predicate, timeout: float, run: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    detail = ""
    if run is not None:
        outs = "".join(p.read_text() for p in sorted((run / "job").glob("slurm-*.out")))
        log = (run / "job/logs/rank_0.log")
        detail = (f"\nstatus: {status(run)}\nbatch output:\n{outs[-3000:]}\nrank 0:\n"
                  f"{log.read_text()[-3000:] if log.exists() else '-'}")
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")


def job_gone(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip() == ""


def submit(cwd: Path, *args: str, env: dict | None = None) -> tuple[Path, str]:
    out = dodo("submit", DEMO, *TINY, f"runs_dir={cwd}/runs", *args, "--cluster", "slurm", cwd=cwd,
               env=env)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split("slurm job ")[1].split()[0]
    (run,) = run_dirs(cwd / "runs", "demo")
    return run, job_id


def finished(run: Path, job_id: str, timeout: float) -> dict:
    wait_for(f"job {job_id} to leave the queue", lambda: job_gone(job_id), timeout, run)
    return status(run)


def trainable_state(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / latest / "mp_rank_00_model_states.pt",
                      weights_only=False)["module"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """`dodo submit jobs/demo.yaml --cluster slurm`: 2 ranks under srun, one per node; it is
    also the uninterrupted reference of the preemption test."""
    cwd = tmp_path_factory.mktemp("straight")
    run, job_id = submit(cwd, *STEPS)
    assert finished(run, job_id, 180)["state"] == "completed"
    return run


def test_demo_runs_one_rank_per_node(straight: Path):
    heads = {r: (straight / f"job/logs/rank_{r}.log").read_text().splitlines()[0] for r in (0, 1)}
    assert "rank 0 on node n1" in heads[0] and "rank 1 on node n2" in heads[1], heads
    s = status(straight)
    assert (s["state"], s["step"], s["world_size"]) == ("completed", 60, 2)
    assert (straight / "summary.json").exists()
    out = dodo("status", str(straight), cwd=straight).stdout
    assert "completed" in out and "slurm" in out and "60/60" in out


def test_preemption_requeues_and_resumes_bitwise(straight: Path, tmp_path: Path):
    run, job_id = submit(tmp_path, *STEPS)
    wait_for("step 5", lambda: status(run).get("step", 0) >= 5, 120, run)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what preemption sends
    s = finished(run, job_id, 240)
    assert s["state"] == "completed", s
    requeues = [json.loads(l) for l in (run / "job/requeues.jsonl").read_text().splitlines()]
    assert len(requeues) == 1 and requeues[0]["job_id"] == job_id
    assert 5 <= requeues[0]["step"] < 60 and "USR2" in requeues[0]["reason"]
    log = (run / "job/logs/rank_0.log").read_text()
    assert f"resumed from {run}/checkpoints/step_{requeues[0]['step']:08d}" in log
    assert "restart 1" in log  # the same job id, started again by Slurm
    # bitwise: losses step by step, and the final trainable parameters
    la = {m["step"]: m["train.loss"] for m in metrics(straight) if "train.loss" in m}
    lb = {m["step"]: m["train.loss"] for m in metrics(run) if "train.loss" in m}
    assert la == lb and sorted(lb) == list(range(1, 61))
    sa, sb = trainable_state(straight), trainable_state(run)
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    row = [l for l in dodo("status", str(run), cwd=tmp_path).stdout.splitlines() if run.name in l][0]
    assert row.split()[3:5] == ["completed", "60/60"] and row.split()[6] == "1"  # one requeue


# Test-only: every optimizer step sleeps, so that a 1-minute allocation cannot finish the run.
SLOW_STEPS = textwrap.dedent("""
    import importlib.abc, importlib.util, os, sys, time

    class _Slow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "dodo.train.loop":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                step = module.Trainer._train_step
                def slow(self, batch):
                    time.sleep(float(os.environ["DODO_TEST_STEP_SLEEP"]))
                    return step(self, batch)
                module.Trainer._train_step = slow
            spec.loader.exec_module = exec_module
            return spec

    if os.environ.get("DODO_TEST_STEP_SLEEP"):
        sys.meta_path.insert(0, _Slow())
""")


def test_time_limit_requeues_until_done_and_stops_at_the_cap(tmp_path: Path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SLOW_STEPS)
    env = {"PYTHONPATH": str(inject), "DODO_TEST_STEP_SLEEP": "0.5"}
    # One rank each, so the two jobs run side by side on n1 and n2. A 1-minute limit with the
    # warning 10 s before it: Slurm's controller checks limits every 30 s, so the signal comes
    # 10 to 40 s before the limit, 20 to 50 s after the start; 90 steps of 0.5 s, after a
    # start-up of 10 s or more, cannot fit in one allocation.
    limits = ["cluster.nodes=1", "cluster.time_limit_min=1", "cluster.signal_lead_s=10", "train.steps=90",
              "train.save_every=1000", "train.log_every=5"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_a, job_a = submit(tmp_path / "a", *limits, "cluster.max_requeues=6", env=env)
    run_b, job_b = submit(tmp_path / "b", *limits, "cluster.max_requeues=0", env=env)
    sb = finished(run_b, job_b, 200)
    assert sb["state"] == "stopped", sb
    assert "cluster.max_requeues=0 reached" in sb["reason"] and f"dodo submit {run_b}" in sb["reason"]
    assert 0 < sb["step"] < 90
    out_b = "".join(p.read_text() for p in (run_b / "job").glob("slurm-*.out"))
    assert "cluster.max_requeues=0 reached" in out_b
    row = [l for l in dodo("status", str(run_b), cwd=tmp_path).stdout.splitlines() if run_b.name in l][0]
    assert "stopped" in row
    sa = finished(run_a, job_a, 420)
    assert sa["state"] == "completed", sa
    requeues = [json.loads(l) for l in (run_a / "job/requeues.jsonl").read_text().splitlines()]
    assert 1 <= len(requeues) <= 6 and all("USR2" in r["reason"] for r in requeues)
    steps = [r["step"] for r in requeues]
    assert steps == sorted(steps) and steps[-1] < 90  # progress in every allocation


def test_cancel_stops_for_good(tmp_path: Path):
    run, job_id = submit(tmp_path, "train.steps=5000", "cluster.nodes=1")
    wait_for("step 3", lambda: status(run).get("step", 0) >= 3, 120, run)
    out = dodo("cancel", str(run), cwd=tmp_path)
    assert f"cancelled slurm job {job_id}" in out.stdout
    finished(run, job_id, 60)
    time.sleep(3)  # a requeue would show up as a pending job again
    assert job_gone(job_id)
    assert not (run / "job/requeues.jsonl").exists()
    row = [l for l in dodo("status", str(run), cwd=tmp_path).stdout.splitlines() if run.name in l][0]
    assert "cancelled" in row


def test_sweep_is_one_array_and_table_has_a_row_per_point(tmp_path: Path):
    out = dodo("sweep", DEMO, *TINY, "train.steps=6", f"runs_dir={tmp_path}/runs", "cluster.nodes=1",
               "--grid", "train.lr=1e-3,3e-3", "train.seed=0,1", "--cluster", "slurm", cwd=tmp_path)
    job_id = out.stdout.split("job array ")[1].split()[0]
    (sweep,) = (tmp_path / "runs/demo").glob("sweep_*")
    script = (sweep / "job/slurm.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script
    wait_for(f"array {job_id} to finish", lambda: job_gone(job_id), 300)
    for i, point in enumerate(sorted(p for p in sweep.iterdir() if p.name.startswith("p"))):
        assert status(point)["state"] == "completed" and status(point)["job_id"] == f"{job_id}_{i}"
    grouped = dodo("status", f"--runs-dir={tmp_path}/runs", cwd=tmp_path).stdout
    assert f"sweep demo/{sweep.name}: 4 points over train.lr x train.seed" in grouped
    table = dodo("table", str(sweep), cwd=tmp_path).stdout
    rows = [l for l in table.splitlines() if l.startswith("| p") and not l.startswith("| point")]
    assert len(rows) == 4 and all("completed" in r for r in rows)
    assert "| point | train.lr | train.seed | state |" in table
    csv_rows = (sweep / "table.csv").read_text().splitlines()
    assert len(csv_rows) == 5


def test_refused_submission_shows_slurm_message_and_leaves_nothing(tmp_path: Path):
    out = dodo("submit", DEMO, *TINY, f"runs_dir={tmp_path}/runs", "cluster.partition=nosuch",
               "--cluster", "slurm", cwd=tmp_path, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "sbatch refused the job" in out.stderr and "Invalid partition name" in out.stderr
    assert "set cluster.partition" in out.stderr and "debug" in out.stderr
    assert not (tmp_path / "runs").exists()
