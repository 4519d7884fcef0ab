"""The CLI as a researcher meets it: errors, dry runs, detached runs, status, logs, cancel, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, dodo, run_dirs


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("args, expected", [
    (["jobs/nope.yaml"], "job file 'jobs/nope.yaml' not found"),
    (["jobs/demo.yaml", "train.stesp=5"], "did you mean 'train.steps'?"),
    (["jobs/demo.yaml", "train.steps=-5"], "train.steps=-5: must be > 0"),
    (["jobs/demo.yaml", "model.adapter.dropout=1.5"], "model.adapter.dropout=1.5: must be in [0, 1)"),
    (["jobs/demo.yaml", "train.steps=abc"], "train.steps must be an integer"),
    (["jobs/demo.yaml", "train.steps"], "key.path=value"),
    (["jobs/demo.yaml", "--cluster", "lsf"], "unknown cluster profile 'lsf'"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(workdir: Path, args, expected):
    before = tree(workdir)
    proc = dodo("submit", *args, cwd=workdir, check=False, timeout=60)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert proc.stderr.startswith("dodo: error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert tree(workdir) == before  # no run directory, nothing else


def test_bad_job_files_name_file_line_and_key(workdir: Path):
    (workdir / "bad_yaml.yaml").write_text("name: x\ntrain: {steps: 5\n")
    proc = dodo("submit", "bad_yaml.yaml", cwd=workdir, check=False, timeout=60)
    assert proc.returncode == 2 and "bad_yaml.yaml:" in proc.stderr and "Traceback" not in proc.stderr
    (workdir / "bad_default.yaml").write_text("defaults: [model/huge]\n")
    proc = dodo("submit", "bad_default.yaml", cwd=workdir, check=False, timeout=60)
    assert proc.returncode == 2 and "model/huge" in proc.stderr and "tiny" in proc.stderr
    (workdir / "bad_key.yaml").write_text("defaults: [model/tiny]\nmodel: {adaptr: {}}\n")
    proc = dodo("submit", "bad_key.yaml", cwd=workdir, check=False, timeout=60)
    assert proc.returncode == 2 and "did you mean 'model.adapter'?" in proc.stderr


def test_missing_pretrained_path_is_caught_at_submit(workdir: Path):
    before = tree(workdir)
    proc = dodo("submit", "jobs/demo.yaml", "model.lm.path=/nonexistent/gpt-j", cwd=workdir,
                check=False, timeout=60)
    assert proc.returncode == 2
    assert "model.lm.path='/nonexistent/gpt-j'" in proc.stderr and "Traceback" not in proc.stderr
    assert tree(workdir) == before


def test_dry_run_prints_config_and_plan_and_writes_nothing(workdir: Path):
    before = tree(workdir)
    proc = dodo("submit", "jobs/demo.yaml", "train.steps=50", "model.adapter.downsample=8", "--dry-run",
                cwd=workdir, timeout=60)
    assert proc.returncode == 0
    assert "steps: 50" in proc.stdout and "downsample: 8" in proc.stdout
    assert "launch plan (local backend)" in proc.stdout and '"stage": 2' in proc.stdout
    assert tree(workdir) == before


def test_resolved_config_is_a_valid_job_file(workdir: Path):
    from dodo.config.loader import dump_config, load_job

    cfg = load_job(workdir / "jobs/demo.yaml", ["train.steps=7"])
    path = workdir / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_job(path) == cfg


@pytest.mark.multiprocess
def test_detach_status_logs_cancel(workdir: Path):
    proc = dodo("submit", "jobs/demo.yaml", *TINY, "train.steps=100000", "train.log_every=5",
                "--detach", cwd=workdir, timeout=60)
    assert "submitted local job" in proc.stdout
    (run,) = run_dirs(workdir / "runs", "demo")
    deadline = time.time() + 120
    while json.loads((run / "status.json").read_text()).get("step", 0) < 5:
        assert time.time() < deadline, (run / "job/logs/rank_0.log").read_text()
        time.sleep(0.5)
    status = dodo("status", cwd=workdir, timeout=60).stdout
    assert "demo/" + run.name in status and "running" in status and "local" in status
    logs = dodo("logs", str(run), "--rank", "1", cwd=workdir, timeout=60)
    assert "[rank 1]" in logs.stdout
    assert dodo("logs", str(run), "--rank", "7", cwd=workdir, check=False, timeout=60).returncode == 2
    assert "cancelled" in dodo("cancel", str(run), cwd=workdir, timeout=60).stdout
    deadline = time.time() + 30
    while "cancelled" not in dodo("status", str(run), cwd=workdir, timeout=60).stdout:
        assert time.time() < deadline
        time.sleep(0.5)
    pids = json.loads((run / "job/backend.json").read_text())["details"]["pids"]
    time.sleep(1)
    for pid in pids:  # the ranks are gone for good (or zombies awaiting the detached launcher)
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z"


@pytest.mark.multiprocess
def test_ctrl_c_stops_after_a_checkpoint_and_resumes(workdir: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "dodo", "submit", "jobs/demo.yaml", *TINY, "train.steps=100000",
         "train.save_every=100000"], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.time() + 120
    while not list((workdir / "runs" / "demo").glob("*/metrics.jsonl")) or \
            "step 3/" not in next((workdir / "runs" / "demo").glob("*/job/logs/rank_0.log")).read_text():
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.3)
    launcher.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 3, out + err
    (run,) = run_dirs(workdir / "runs", "demo")
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and "interrupt" in status["reason"]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{status['step']:08d}" and "stopped at step" in out


# ---------------------------------------------------------------- a fast, torch-free CLI

HEAVY = ("torch", "transformers", "deepspeed", "triton", "dodo_kernels")


def test_import_cli_pulls_in_no_torch():
    code = ("import sys, dodo.cli; heavy = [m for m in " + repr(HEAVY) + " if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize("args", [["submit", "jobs/demo.yaml", "--dry-run"],
                                  ["submit", "jobs/moe_demo.yaml", "--dry-run"],
                                  ["submit", "jobs/prompt_structured_vitb16.yaml", "--dry-run"],  # dodo.models.prompt.config
                                  ["submit", "jobs/lang_adapter_vitb16.yaml", "--dry-run"],  # dodo.models.lang_adapter.config
                                  ["submit", "jobs/weak_reprogram_vitb16.yaml", "--dry-run"],  # dodo.models.weak.config
                                  ["submit", "jobs/vlmo_stage_mlm.yaml", "--dry-run"],  # dodo.models.vlmo.config
                                  ["submit", "jobs/vlmo_vqa_base.yaml", "--dry-run"],  # its fine-tuning checks
                                  ["status"], ["sweep", "jobs/demo.yaml", "--grid", "train.lr=1e-4,2e-4", "--dry-run"]])
def test_submit_dry_run_and_status_import_no_torch(workdir: Path, args):
    """-X importtime lists every module imported (stderr, one line each, the name last)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dodo", *args], cwd=workdir,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_status_json_has_one_locked_writer(tmp_path: Path):
    """Launcher and rank 0 update status.json at the same time: no key is lost."""
    from concurrent.futures import ProcessPoolExecutor

    from dodo.rundir import RunDir

    run = RunDir.create(tmp_path, "r", "name: r\n")
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_update_status, [(str(run.path), f"k{i}") for i in range(40)]))
    assert all(f"k{i}" in run.status() for i in range(40))


def _update_status(args: tuple[str, str]) -> None:
    from dodo.rundir import RunDir

    path, key = args
    RunDir(Path(path)).update_status(**{key: 1})


def test_logs_cancel_status_of_a_run_import_no_torch(tmp_path: Path):
    from dodo.cluster.backend import JobRecord
    from dodo.rundir import RunDir

    run = RunDir.create(tmp_path / "runs", "r", "name: r\n")
    run.rank_log(0).write_text("step 1\n")
    JobRecord("local", "1", time.time(), {"pids": []}).save(run)
    for args in (["logs", str(run.path)], ["status", str(run.path)], ["cancel", str(run.path)]):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dodo", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        assert imported and not imported & set(HEAVY), (args, sorted(imported & set(HEAVY)))
