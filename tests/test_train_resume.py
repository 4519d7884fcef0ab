"""Resume is tested by equality: N steps straight == k steps, stop or kill, resume to N.

All runs are real: `dodo submit` starts 2 processes that train with DeepSpeed ZeRO-2 on gloo.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from conftest import TINY, dodo, metrics, run_dirs

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def trainable_state(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=False)
    return state["module"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train.loss"] for r in metrics(run) if "train.loss" in r}


def assert_same_training(a: Path, b: Path, steps: int) -> None:
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
    assert la == lb  # bitwise, step by step
    sa, sb = trainable_state(a), trainable_state(b)
    assert sa.keys() == sb.keys() and len(sa) > 0
    # Only trainable state is saved: adapters and the prefix projection, no frozen base weights.
    assert all(".adapter." in k or k.startswith("prefix.") for k in sa), sorted(sa)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """20 steps in one go: the reference for both resume tests."""
    cwd = tmp_path_factory.mktemp("straight")
    dodo("submit", str(Path(__file__).parents[1] / "jobs/demo.yaml"), *TINY, "train.steps=20",
         "train.save_every=10", f"runs_dir={cwd}/runs", cwd=cwd)
    (run,) = run_dirs(cwd / "runs", "demo")
    return run


def test_stop_and_resume_is_bitwise_identical(straight: Path, tmp_path: Path):
    job = Path(__file__).parents[1] / "jobs/demo.yaml"
    first = dodo("submit", str(job), *TINY, "train.steps=20", "train.save_every=10",
                 "train.steps_per_allocation=10", f"runs_dir={tmp_path}/runs", cwd=tmp_path)
    assert first.returncode == 3, first.stdout
    (run,) = run_dirs(tmp_path / "runs", "demo")
    assert "stopped at step 10/20" in first.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    second = dodo("submit", str(run), cwd=tmp_path)  # 10 more steps reach the end: it finishes
    assert second.returncode == 0, second.stdout
    assert_same_training(straight, run, 20)
    assert "summary of demo" in second.stdout


# Test-only fault injection through sitecustomize: rank 1 is SIGKILLed in the middle of writing
# the step-20 checkpoint (after DeepSpeed's shards, before its own RNG file), the way a node
# failure would hit it. Production code has no hook for this.
KILL_IN_CHECKPOINT = textwrap.dedent("""
    import os, signal
    if os.environ.get("RANK") == "1":
        import torch
        _save = torch.save
        def save(obj, f, *args, **kwargs):
            if "step_00000020" in str(f) and "dodo_rank_" in str(f):
                os.kill(os.getpid(), signal.SIGKILL)
            return _save(obj, f, *args, **kwargs)
        torch.save = save
""")


def test_kill_during_checkpoint_keeps_previous_one(straight: Path, tmp_path: Path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(KILL_IN_CHECKPOINT)
    job = Path(__file__).parents[1] / "jobs/demo.yaml"
    # cluster.max_restarts=0: the launcher would otherwise retry (tests/test_resilience_faults.py)
    crashed = dodo("submit", str(job), *TINY, "train.steps=20", "train.save_every=10", "cluster.max_restarts=0",
                   f"runs_dir={tmp_path}/runs", cwd=tmp_path, env={"PYTHONPATH": str(inject)},
                   check=False)
    assert crashed.returncode == 1, crashed.stdout + crashed.stderr
    assert "rank 1 on" in crashed.stderr and "killed by SIGKILL; cluster.max_restarts=0 used up" in crashed.stderr
    (run,) = run_dirs(tmp_path / "runs", "demo")
    published = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert published == ["step_00000010"]  # the half-written step 20 is not visible
    resumed = dodo("submit", str(run), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout
    assert "resumed from" in (run / "job/logs/rank_0.log").read_text()
    assert_same_training(straight, run, 20)
