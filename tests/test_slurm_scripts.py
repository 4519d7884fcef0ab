"""Cluster profiles, rendered batch scripts (golden files) and the continuation decision.

No scheduler needed. Golden files live in tests/golden/; delete one to re-record it (the test
then writes it and passes, except under CI=true, where a missing golden file is a failure).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, dodo
from dodo.cluster.batch import ScriptPaths
from dodo.cluster.continuation import cancel_marker, decide, requeues_file
from dodo.cluster.lsf import render_bsub
from dodo.cluster.slurm import render_sbatch
from dodo.config.errors import ConfigError
from dodo.config.loader import load_job
from dodo.rundir import RunDir

GOLDEN = Path(__file__).parent / "golden"
DEMO = REPO / "jobs" / "demo.yaml"
# Fixed paths, so that the scripts do not depend on where the repo or the venv live.
PATHS = dict(python="/opt/dodo/.venv/bin/python", wrapper="/opt/dodo/hpc/launch/rank.sh")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"golden file {path} is missing; record it by running this test outside CI")
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert text == path.read_text(), f"{name} changed; if that is intended, delete {path} to re-record"


def paths(runs: list[str], job_dir: str) -> ScriptPaths:
    return ScriptPaths(PATHS["python"], PATHS["wrapper"], tuple(runs), job_dir)


SLURM_SITE = ["cluster.partition=gpu", "cluster.account=abc123", "cluster.qos=normal",
              "cluster.constraint=a100", "cluster.memory=480G", "cluster.nodes=4",
              "cluster.tasks_per_node=4", "cluster.gpus_per_task=1", "cluster.gpus_per_node=4",
              "cluster.cpus_per_node=64", "cluster.cpus_per_task=16", "cluster.threads_per_task=8",
              "cluster.time_limit_min=240", "cluster.signal_lead_s=300",
              "cluster.setup=['module load cuda/12.4', 'export NCCL_DEBUG=WARN']",
              "cluster.directives=['--exclusive']"]
SUMMIT = ["cluster.project=ABC123", "cluster.nodes=16"]


def test_sbatch_golden_single_run():
    cfg = load_job(DEMO, SLURM_SITE, cluster_profile="slurm")
    check_golden("slurm_site.sbatch", render_sbatch(cfg, paths(["/scratch/runs/demo/RUN"],
                                                                "/scratch/runs/demo/RUN/job")))


def test_sbatch_golden_array_and_test_cluster():
    cfg = load_job(DEMO, ["cluster.array_parallel=2", "cluster.nodes=1"], cluster_profile="slurm")
    runs = [f"/scratch/runs/demo/sweep_X/p{i}" for i in range(4)]
    text = render_sbatch(cfg, paths(runs, "/scratch/runs/demo/sweep_X/job"))
    assert "#SBATCH --array=0-3%2" in text and 'RUN=${RUNS[$SLURM_ARRAY_TASK_ID]}' in text
    check_golden("slurm_array.sbatch", text)


def test_bsub_golden_summit():
    cfg = load_job(DEMO, SUMMIT, cluster_profile="summit")
    text = render_bsub(cfg, paths(["/gpfs/runs/demo/RUN"], "/gpfs/runs/demo/RUN/job"))
    for line in ("#BSUB -P ABC123", "#BSUB -q batch", "#BSUB -nnodes 16", "#BSUB -W 2:00", "#BSUB -J demo",
                 '#BSUB -alloc_flags "gpumps smt4"', "#BSUB -wa USR2", "#BSUB -wt 10",
                 "jsrun -n 96 -a 1 -g 1 -c 7 -r 6 --bind packed:7"):
        assert line in text, line
    assert "DS_ACCELERATOR" not in text  # GPU ranks
    check_golden("summit.bsub", text)


def test_bsub_golden_summit_array():
    cfg = load_job(DEMO, SUMMIT + ["cluster.array_parallel=2"], cluster_profile="summit")
    runs = [f"/gpfs/runs/demo/sweep_X/p{i}" for i in range(4)]
    text = render_bsub(cfg, paths(runs, "/gpfs/runs/demo/sweep_X/job"))
    assert '#BSUB -J "demo[1-4]%2"' in text and 'RUN=${RUNS[$LSB_JOBINDEX - 1]}' in text
    check_golden("summit_array.bsub", text)


# ---------------------------------------------------------------- profiles


def test_profile_precedence(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_text("defaults: [model/tiny]\nname: p\ncluster: {profile: slurm, nodes: 3}\n")
    cfg = load_job(job, ["cluster.time_limit_min=7"], configs_dir=REPO / "configs")
    # profile < job's own cluster keys < overrides
    assert (cfg.cluster.backend, cfg.cluster.nodes, cfg.cluster.time_limit_min) == ("slurm", 3, 7)
    # --cluster NAME: the profile beats the job file's cluster keys; overrides still win
    cfg = load_job(DEMO, ["cluster.max_requeues=4"], cluster_profile="slurm")
    assert (cfg.cluster.backend, cfg.cluster.nodes, cfg.cluster.tasks_per_node) == ("slurm", 2, 1)
    assert cfg.cluster.max_requeues == 4 and cfg.cluster.profile == "slurm"
    job.write_text("defaults: [model/tiny]\nname: p\ncluster: summit\n")
    cfg = load_job(job, ["cluster.project=XYZ"], configs_dir=REPO / "configs")
    assert (cfg.cluster.backend, cfg.cluster.tasks_per_node, cfg.cluster.project) == ("lsf", 6, "XYZ")


@pytest.mark.parametrize("profile, overrides, expected", [
    ("sumit", [], "unknown cluster profile 'sumit'"),
    ("summit", [], "cluster.project='': is required by the site of profile 'summit'"),
    ("summit", ["cluster.project=A", "cluster.tasks_per_node=8"], "8 ranks x 1 GPUs = 8 GPUs per node, but a node"),
    ("slurm", ["cluster.tasks_per_node=2"], "2 ranks x 1 cores = 2 cores per node, but a node"),
    ("slurm", ["cluster.signal_lead_s=3600", "cluster.time_limit_min=30"], "shorter than the time limit"),
])
def test_bad_profile_input_is_one_clear_error(profile, overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_job(DEMO, overrides, cluster_profile=profile)
    assert expected in str(err.value)
    if profile == "sumit":
        assert "did you mean 'summit'?" in str(err.value) and "summit (lsf)" in str(err.value)


# ---------------------------------------------------------------- continuation


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    run = RunDir.create(tmp_path, "demo", "name: demo\n")
    (run.job / "backend.json").write_text(json.dumps({"backend": "slurm", "job_id": "7",
                                                      "submitted": time.time() - 100, "details": {}}))
    return run


def test_continuation_decisions(run: RunDir):
    run.update_status(state="stopped", step=12, total_steps=60, reason="warning signal (USR2)")
    d = decide(run, 3, max_requeues=2)
    assert d.action == "requeue" and "requeue 1 of at most 2 at step 12/60" in d.message
    # mpirun may report 0 after a stop; rank 0's "stopped" decides
    assert decide(run, 0, max_requeues=2).action == "requeue"
    with open(requeues_file(run), "a") as f:  # two requeues in this submission, one before it
        for t in (time.time() - 1000, time.time() - 50, time.time() - 10):
            f.write(json.dumps({"time": t}) + "\n")
    d = decide(run, 3, max_requeues=2)
    assert d.action == "stop" and "cluster.max_requeues=2 reached (2 requeues in this submission)" in d.message
    assert f"dodo submit {run.path}" in d.message
    run.update_status(state="running")
    d = decide(run, 1, max_requeues=2)
    assert d.action == "fail" and "status 1" in d.message
    run.update_status(state="completed")
    assert decide(run, 0, max_requeues=2).action == "done"
    cancel_marker(run).write_text("x")
    assert decide(run, 3, max_requeues=2).action == "cancelled"


DEMO_JOB = str(DEMO)


def test_missing_sbatch_is_a_clear_error(tmp_path: Path):
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(Path(sys.executable))
    out = dodo("submit", DEMO_JOB, *TINY, f"runs_dir={tmp_path}/runs", "--cluster", "slurm", cwd=tmp_path,
               check=False, env={"PATH": str(bare)})
    assert out.returncode == 2 and "sbatch is not on PATH" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_batch_backends_differ_only_in_their_hooks():
    """Slurm and LSF share BatchBackend (submit, record, state, cancel, requeue); the hooks differ."""
    import subprocess

    from dodo.cluster.backend import get_backend
    from dodo.cluster.batch import BatchBackend

    slurm, lsf = get_backend("slurm"), get_backend("lsf")
    assert isinstance(slurm, BatchBackend) and isinstance(lsf, BatchBackend)
    assert slurm.requeue_command({}, "12") == ["scontrol", "requeue", "12"]
    assert lsf.requeue_command({"lsf_continuation": "requeue"}, "7[2]") == ["brequeue", "7[2]"]
    assert lsf.requeue_command({"lsf_continuation": "chain"}, "7") is None  # chained bsub instead
    assert slurm.current_job_id({"SLURM_JOB_ID": "55"}) == "55"
    assert lsf.current_job_id({"LSB_JOBID": "9", "LSB_JOBINDEX": "3"}) == "9[3]"
    assert lsf.current_job_id({"LSB_JOBID": "9", "LSB_JOBINDEX": "0"}) == "9"
    assert (slurm.element_id("5", 0), lsf.element_id("5", 0)) == ("5_0", "5[1]")
    ok = subprocess.CompletedProcess([], 0, stdout="Job <123> is submitted to queue <batch>.\n", stderr="")
    assert lsf.job_id_from(ok) == "123" and slurm.job_id_from(
        subprocess.CompletedProcess([], 0, stdout="456;cluster\n", stderr="")) == "456"
    assert lsf.job_id_from(subprocess.CompletedProcess([], 0, stdout="queue full", stderr="")) is None
