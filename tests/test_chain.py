"""Stage chains (`dodo chain`): the chain file, run directories made up front and passed to later
stages, the scheduler dependencies (LSF plan golden-tested), and chains run end to end locally
(dense -> upcycled MoE) and on the two-node Slurm, where a failed stage stops its dependant."""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, dodo
from dodo.cluster import chain as chains
from dodo.cluster import chain_submit
from dodo.cluster.lsf import LsfBackend
from dodo.cluster.slurm import SlurmBackend
from dodo.config.errors import ConfigError
from dodo.config.loader import load_job
from test_slurm_scripts import check_golden, paths

SMALL = [*TINY, "data.num_train=128", "data.num_eval=16", "train.caption_samples=2", "train.warmup_steps=0",
         "train.steps=3"]
UPCYCLE = """
    name: upcycle
    overrides: {overrides}
    stages:
      dense: {{job: {repo}/jobs/demo.yaml}}
      moe:
        job: {repo}/jobs/moe_upcycled_demo.yaml
        overrides: {{model.moe.upcycle_from: "${{stages.dense.run_dir}}"}}
"""


def write_chain(folder: Path, text: str, **fmt) -> Path:
    path = folder / "chain.yaml"
    path.write_text(textwrap.dedent(text.format(repo=REPO, overrides=json.dumps(SMALL), **fmt)))
    return path


@pytest.mark.parametrize("body, expected", [
    ("stages: {a: {job: jobs/demo.yaml, overrides: {x: '${stages.b.run_dir}'}}, b: {job: jobs/demo.yaml}}",
     "names stage 'b', which is not listed before it"),
    ("stages: {a: {job: jobs/demo.yaml}, b: {job: jobs/demo.yaml, overrides: {x: '${run_dir}'}}}",
     "is not a reference dodo knows"),
    ("stages: {a: {job: jobs/demo.yaml, after: [a]}}", "after must list stages named before it"),
    ("stages: {a: {jobs: jobs/demo.yaml}}", "needs `job: jobs/<name>.yaml`"),
    ("stages: {a: {job: jobs/demo.yaml}}\nseeds: [1, 1]", "seeds must be a list of distinct integers"),
    ("stage: {a: {job: jobs/demo.yaml}}", "expected a mapping with `stages:`"),
    ("stages: {a b: {job: jobs/demo.yaml}}", "a stage name is letters"),
])
def test_bad_chain_files(tmp_path: Path, body: str, expected: str):
    path = tmp_path / "c.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        chains.read_chain(str(path))


def test_run_dirs_made_up_front_and_resolved_per_seed(tmp_path: Path):
    text = UPCYCLE + "    seeds: [0, 1]\n"
    chain, configs = chains.create(str(write_chain(tmp_path, text)), [f"runs_dir={tmp_path}/runs"], None)
    assert [i.dir for i in chain.instances] == ["dense_s0", "moe_s0", "dense_s1", "moe_s1"]
    assert sorted(p.name for p in chain.path.iterdir()) == ["chain.json", "chain.yaml", "dense_s0", "dense_s1",
                                                            "job", "moe_s0", "moe_s1"]
    moe = configs[3]  # the same seed's dense run, an absolute path that exists before any stage runs
    assert moe.model.moe.upcycle_from == str(chain.path / "dense_s1") and moe.data.seed == 1  # the default seed key
    assert chain.instances[3].deps == ["dense_s1"] and moe.name == chain.instances[3].job_name
    assert (chain.path / "dense_s1" / "config.yaml").is_file() and moe.train.steps == 3
    assert chains.Chain.open(chain.path).instances == chain.instances
    from dodo.cluster.table import method_table
    from dodo.rundir import write_json_atomic

    for i, run in enumerate(chain.runs()):  # as if each stage had run: one table row per stage
        write_json_atomic(run.summary_file, {"final": {"eval.loss": float(i)}, "trainable_parameters": 100 * i})
    header, rows = method_table(chain, "methods")
    assert header == ["method", "seeds", "trainable params", "eval.loss"]
    assert rows == [["dense", "2", "100", "1 ± 1.414"], ["moe", "2", "200", "2 ± 1.414"]]
    other = write_chain(tmp_path, UPCYCLE + "    seeds: [7]\n    seed_key: model.init_seed\n")
    _, (dense, moe_cfg) = chains.create(str(other), [f"runs_dir={tmp_path}/runs"], None)
    assert dense.model.init_seed == moe_cfg.model.init_seed == 7 and dense.train.seed == 0
    status = dodo("status", str(chain.path), cwd=tmp_path).stdout
    assert "chain upcycle/chain_" in status and ": dense -> moe x 2 seeds (not submitted)" in status
    assert "  moe_s1" in status


def test_a_bad_stage_is_one_line_and_writes_nothing(tmp_path: Path):
    path = write_chain(tmp_path, UPCYCLE.replace('"${{stages.dense.run_dir}}"}}',
                                                 '"${{stages.dense.run_dir}}", train.steps: -1}}'))
    out = dodo("chain", str(path), f"runs_dir={tmp_path}/runs", cwd=tmp_path, check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "dodo: error: chain stage moe (" in out.stderr and "train.steps" in out.stderr
    assert not (tmp_path / "runs").exists()
    dry = dodo("chain", str(write_chain(tmp_path, UPCYCLE)), "--dry-run", f"runs_dir={tmp_path}/runs", cwd=tmp_path)
    assert "stage moe (job upcycle.moe.xxxx), after dense" in dry.stdout and not (tmp_path / "runs").exists()


def test_lsf_and_slurm_submission_plans(tmp_path: Path):
    """The masked-adapter chain on Summit: the transfer stage waits for both pretext stages by job
    name (a stage continued by a chained follow-up keeps its name); pinned by golden files."""
    path = tmp_path / "masked.yaml"
    path.write_text(textwrap.dedent(f"""
        name: masked
        overrides: [cluster.project=ABC123, cluster.nodes=2]
        stages:
          mim: {{job: {REPO}/jobs/masked_adapters_mim.yaml}}
          mlm: {{job: {REPO}/jobs/masked_adapters_mlm.yaml}}
          transfer:
            job: {REPO}/jobs/masked_adapters_transfer.yaml
            overrides: {{model.clip.init_adapters: ["${{stages.mim.run_dir}}", "${{stages.mlm.run_dir}}"]}}
    """))
    chain, configs = chains.create(str(path), [f"runs_dir={tmp_path}/runs"], "summit")
    token = chain.instances[0].job_name.rsplit(".", 1)[1]

    def fixed(text: str) -> str:
        return text.replace(str(chain.path), "/gpfs/runs/masked/CHAIN").replace(token, "TOKEN")
    lsf = fixed(chain_submit.render_plan(chain, LsfBackend()))
    assert ("bsub -w 'done(\"masked.mim.TOKEN\") && done(\"masked.mlm.TOKEN\")' -ti "
            "< /gpfs/runs/masked/CHAIN/transfer/job/lsf.bsub") in lsf
    check_golden("chain_summit.sh", lsf)
    transfer = configs[2]
    assert transfer.model.clip.init_adapters == [str(chain.path / "mim"), str(chain.path / "mlm")]
    from dodo.cluster.lsf import render_bsub

    stage = fixed(render_bsub(transfer, paths([str(chain.path / "transfer")], str(chain.path / "transfer/job"))))
    assert "#BSUB -J masked.transfer.TOKEN" in stage
    check_golden("chain_summit_transfer.bsub", stage)
    slurm = fixed(chain_submit.render_plan(chain, SlurmBackend()))
    assert ("transfer=$(sbatch --parsable --dependency=afterok:${mim}:${mlm} --kill-on-invalid-dep=yes "
            "/gpfs/runs/masked/CHAIN/transfer/job/slurm.sbatch)") in slurm
    assert chain_submit.dependency_options("slurm", [("41", "a")]) == ["--dependency=afterok:41",
                                                                  "--kill-on-invalid-dep=yes"]


def summaries(chain_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in chain_dir.glob("*/summary.json")}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_local_chain_dense_then_upcycled(workdir: Path):
    """2 ranks per stage: the MoE stage starts from the dense stage's run directory; top-2 of
    identical experts computes what the dense model ended with, so its initial held-out loss
    equals the dense run's final one."""
    out = dodo("chain", str(write_chain(workdir, UPCYCLE)), f"runs_dir={workdir}/runs", cwd=workdir, timeout=600)
    assert "2 of 2 stage runs completed" in out.stdout
    (folder,) = (workdir / "runs" / "upcycle").glob("chain_*")
    s = summaries(folder)
    assert s["moe"]["initial"]["eval.loss"] == pytest.approx(s["dense"]["final"]["eval.loss"], rel=1e-6)
    assert s["moe"]["trainable_parameters"] > s["dense"]["trainable_parameters"]
    table = dodo("table", str(folder), "--layout", "methods", cwd=workdir).stdout
    assert re.search(r"\| dense \| 1 \| [\d,]+ \|", table) and "| moe | 1 |" in table


@pytest.mark.slow
@pytest.mark.multiprocess
def test_local_failed_stage_stops_its_dependant(workdir: Path):
    out = dodo("chain", str(write_chain(workdir, UPCYCLE)), f"runs_dir={workdir}/runs", cwd=workdir,
               timeout=600, check=False, env={"DODO_INJECT_NAN_AT_STEP": "1", "DODO_INJECT_NAN_RANK": "all"})
    (folder,) = (workdir / "runs" / "upcycle").glob("chain_*")
    log = folder / "dense" / "job" / "logs" / "rank_0.log"
    assert out.returncode == 4, out.stderr  # the failed stage's own status (4: diverged)
    assert f"stage dense ended failed (exit 4); its log: {log}" in out.stderr
    assert f"stage moe: not run: stage dense ended failed (diverged" in out.stderr and f"its log: {log}" in out.stderr
    assert "0 of 2 stage runs completed" in out.stdout
    assert not (folder / "moe" / "job" / "logs" / "rank_0.log").exists()  # never started
    status = dodo("status", str(folder), cwd=workdir).stdout
    assert re.search(r"  moe +- +- +blocked", status) and "    not run: stage dense ended failed" in status


# ---------------------------------------------------------------- on the two-node Slurm


def require_slurm() -> None:
    """As tests/test_slurm.py: skipped with the reason where the test cluster is not up (CI: fail)."""
    import os
    import shutil
    import subprocess

    script = REPO / "hpc" / "testcluster" / "slurm-testcluster.sh"
    if shutil.which("sinfo") and subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0:
        return
    message = "the test Slurm cluster is not up (`sudo hpc/testcluster/slurm-testcluster.sh start`, or `make test`)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def wait_gone(job_ids: list[str], timeout: float) -> None:
    import subprocess
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"], capture_output=True, text=True)
        if not out.stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"jobs {job_ids} still queued after {timeout:.0f} s")


def slurm_chain(tmp_path: Path, env: dict | None = None) -> tuple[Path, list[str]]:
    out = dodo("chain", str(write_chain(tmp_path, UPCYCLE)), f"runs_dir={tmp_path}/runs", "--cluster", "slurm",
               cwd=tmp_path, env=env)
    ids = out.stdout.split("as slurm jobs ")[1].split(" (")[0].split(", ")
    (folder,) = (tmp_path / "runs" / "upcycle").glob("chain_*")
    return folder, ids


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.multiprocess
def test_slurm_chain_waits_for_its_input(tmp_path: Path):
    require_slurm()
    folder, ids = slurm_chain(tmp_path)
    assert f"--dependency=afterok:${{dense}}" in (folder / "job" / "submit.sh").read_text()
    wait_gone(ids, 400)
    s = summaries(folder)
    assert set(s) == {"dense", "moe"}, dodo("status", str(folder), cwd=tmp_path).stdout
    assert s["moe"]["initial"]["eval.loss"] == pytest.approx(s["dense"]["final"]["eval.loss"], rel=1e-6)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.multiprocess
def test_slurm_failed_stage_cancels_its_dependant(tmp_path: Path):
    import subprocess

    require_slurm()
    folder, (dense, moe) = slurm_chain(tmp_path, env={"DODO_INJECT_NAN_AT_STEP": "1",
                                                       "DODO_INJECT_NAN_RANK": "all"})
    wait_gone([dense, moe], 300)
    said = subprocess.run(["scontrol", "show", "job", moe], capture_output=True, text=True).stdout
    assert "JobState=CANCELLED" in said and "DependencyNeverSatisfied" in said, said
    assert not (folder / "moe" / "job" / "logs" / "rank_0.log").exists()
    status = dodo("status", str(folder), cwd=tmp_path).stdout
    assert re.search(r"  moe +slurm +\d+ +never started \(slurm: CANCELLED\)", status), status
    log = folder / "dense" / "job" / "logs" / "rank_0.log"
    assert f"    not run: stage dense ended failed" in status and f"its log: {log}" in status


# ---------------------------------------------------------------- under the fake LSF (tests/test_lsf.py)

from test_lsf import ON_THIS_MACHINE, fake_lsf  # noqa: E402,F401 (a fixture: mpirun as jsrun)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fake_lsf_failed_stage_ends_its_dependant(fake_lsf, tmp_path: Path):  # noqa: F811
    import subprocess

    out = dodo("chain", str(write_chain(tmp_path, UPCYCLE)), f"runs_dir={tmp_path}/runs", *ON_THIS_MACHINE,
               "--cluster", "summit", cwd=tmp_path,
               env={**fake_lsf, "DODO_INJECT_NAN_AT_STEP": "1", "DODO_INJECT_NAN_RANK": "all"})
    dense, moe = out.stdout.split("as lsf jobs ")[1].split(" (")[0].split(", ")
    (folder,) = (tmp_path / "runs" / "upcycle").glob("chain_*")

    def stats() -> list[str]:
        return subprocess.run(["bjobs", "-o", "jobid stat", "-noheader", dense, moe], capture_output=True,
                              text=True, env={**os.environ, **fake_lsf}).stdout.split()[1::2]
    deadline = time.time() + 240
    while stats() != ["EXIT", "EXIT"] and time.time() < deadline:
        time.sleep(1)
    assert stats() == ["EXIT", "EXIT"]
    assert not (folder / "moe" / "job" / "logs" / "rank_0.log").exists()
    status = dodo("status", str(folder), cwd=tmp_path, env=fake_lsf).stdout
    assert re.search(r"  moe +lsf +\d+ +never started \(lsf: EXIT\)", status), status
    assert "    not run: stage dense ended failed" in status


@pytest.mark.parametrize("name, runs", [("masked_adapters", 21), ("upcycle", 6)])
def test_shipped_chains_dry_run(workdir: Path, name: str, runs: int):
    (workdir / "chains").symlink_to(REPO / "chains")
    out = dodo("chain", f"chains/{name}.yaml", "--dry-run", f"runs_dir={workdir}/runs", cwd=workdir)
    assert f"# {runs} stage runs checked" in out.stdout and not (workdir / "runs").exists()


def test_local_chain_stops_with_a_stopped_stage(tmp_path: Path):
    """A signal stops the stage it reaches after a checkpoint (state stopped, exit 3); the chain
    then starts no later stage, even one that does not depend on it."""
    text = UPCYCLE + "    seeds: [0, 1]\n"
    chain, configs = chains.create(str(write_chain(tmp_path, text)), [f"runs_dir={tmp_path}/runs"], None)
    started = []

    class Backend:  # the local backend's contract: run in the foreground, leave the state in status.json
        def submit(self, run, cfg, foreground):
            started.append(run.path.name)
            run.update_status(state="stopped", reason="terminate signal (TERM)")
            return None, 3

    worst, problems = chain_submit.run_local(chain, configs, Backend())
    assert started == ["dense_s0"] and worst == 3
    assert problems[0].startswith("stage dense_s0 ended stopped (exit 3)")
    for line, name in zip(problems[1:], ["moe_s0", "dense_s1", "moe_s1"]):
        assert line.startswith(f"stage {name}: not run: the chain stopped at stage dense_s0 (terminate signal")
        assert f"`dodo submit {chain.path / 'dense_s0'}` resumes that stage" in line
    assert chain.run(chain.instances[2]).status()["state"] == "blocked"
