"""Hostile and broken input: every mutated job file or override is one short `dodo: error:` line,
exit 2, and nothing written (no runs/ folder); overrides go before or after flags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import dodo


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _alias_bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


JOB = "defaults: [model/tiny, adapter/bottleneck, data/synthetic, train/demo]\n"
# name -> (job file text, what the message must say)
MUTATED = {
    "lr_inf": (JOB + "train: {lr: .inf}\n", "train.lr must be a finite number"),
    "lr_nan": (JOB + "train: {lr: .nan}\n", "train.lr must be a finite number"),
    "steps_int64": (JOB + f"train: {{steps: {2**64}}}\n", "fits in 64 bits"),
    "tasks_100k": (JOB + "cluster: {backend: local, tasks_per_node: 100000}\n", f"{os.cpu_count()} CPU"),
    "empty": ("", "is empty"),
    "comments_only": ("# nothing here\n", "is empty"),
    "long_name": (JOB + "name: " + "x" * 10_000_000 + "\n", "bytes, more than"),
    "long_name_small_file": (JOB + "name: " + "x" * 100_000 + "\n", "characters long"),
    "list_200k": (JOB + "eval: {retrieval_ks: [" + ", ".join(["1"] * 200_000) + "]}\n", "more than"),
    "list_20k": (JOB + "eval: {retrieval_ks: [" + ", ".join(["1"] * 20_000) + "]}\n", "20,000 elements"),
    "deep": ("a: " + "[" * 2000 + "]" * 2000 + "\n", "nested more than"),
    "alias_bomb": (_alias_bomb(), "YAML aliases"),
}


@pytest.mark.parametrize("name", sorted(MUTATED))
def test_mutated_job_file_is_one_short_error_and_writes_nothing(workdir: Path, name: str):
    text, expected = MUTATED[name]
    (workdir / "job.yaml").write_text(text)
    before = tree(workdir)
    proc = dodo("submit", "job.yaml", cwd=workdir, check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("dodo: error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and len(proc.stderr) < 800, proc.stderr[:2000]
    assert expected in proc.stderr, proc.stderr
    assert tree(workdir) == before and not (workdir / "runs").exists()


def test_fifo_job_file_says_not_a_regular_file(workdir: Path):
    os.mkfifo(workdir / "pipe.yaml")
    proc = dodo("submit", "pipe.yaml", cwd=workdir, check=False, timeout=60)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr and "not found" not in proc.stderr


@pytest.mark.parametrize("override, expected", [
    ("train.lr=.inf", "train.lr must be a finite number"),
    (f"train.steps={2**70}", "fits in 64 bits"),
    ("name=" + "y" * 100_000, "characters long"),
])
def test_bad_override_is_one_short_error(workdir: Path, override: str, expected: str):
    proc = dodo("submit", "jobs/demo.yaml", override, cwd=workdir, check=False, timeout=60)
    assert proc.returncode == 2 and expected in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and len(proc.stderr) < 800
    assert not (workdir / "runs").exists()


def test_overrides_before_or_after_flags(workdir: Path):
    after = dodo("submit", "jobs/demo.yaml", "--dry-run", "train.steps=5", cwd=workdir, timeout=60)
    mixed = dodo("submit", "jobs/demo.yaml", "train.steps=5", "--dry-run", "train.seed=3", cwd=workdir, timeout=60)
    assert "steps: 5" in after.stdout and "steps: 5" in mixed.stdout and "seed: 3" in mixed.stdout
    sweep = dodo("sweep", "jobs/demo.yaml", "--dry-run", "--grid", "train.lr=1e-4,2e-4", "--cluster", "local",
                 "train.steps=5", cwd=workdir, timeout=60)
    assert "2 points" in sweep.stdout
    stray = dodo("submit", "jobs/demo.yaml", "--dry-run", "--bogus", cwd=workdir, check=False, timeout=60)
    assert stray.returncode == 2 and "unrecognized arguments: --bogus" in stray.stderr


def test_damaged_cache_is_refused_at_submit(workdir: Path):
    """A shard with a flipped byte: one line at submit (data.verify: checksum), nothing written."""
    dodo("data", "cache", "train", "--from", "synthetic", "--num", "64", "--out", "cache",
         "--samples-per-shard", "32", "--image-size", "16", cwd=workdir, timeout=120)
    shard = sorted((workdir / "cache" / "shards").iterdir())[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    args = ["jobs/demo.yaml", "data.kind=hdf5", "data.train_cache=cache", "data.image_size=16"]
    proc = dodo("submit", *args, cwd=workdir, check=False, timeout=120)
    assert proc.returncode == 2 and "fails its sha256 checksum" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not (workdir / "runs").exists()
    # data.verify: size does not see flipped bytes (documented); a truncated shard it does see.
    shard.write_bytes(bytes(data[:-10]))
    proc = dodo("submit", *args, "data.verify=size", cwd=workdir, check=False, timeout=120)
    assert proc.returncode == 2 and "bytes, the manifest says" in proc.stderr
    assert not (workdir / "runs").exists()
