"""Resuming a run directory: what may change, the checks that refuse, and the overrides record.

`dodo submit RUN_DIR key=value ...` never edits the run's config.yaml itself. Every check that
could refuse the resume (changed keys, global batch, world size and ep_size of an MoE run) runs
in `dodo submit` before anything is written or launched. An accepted set of overrides is kept
apart from the original config, one record per submission:

    job/overrides/<n>.yaml   {overrides: [...], changes: [...], state: pending|applied|refused|superseded}

The ranks load config.yaml plus the newest *pending* record (`load_run_config`). Rank 0 marks it
`applied` and only then writes the merged config.yaml, once the checkpoint has loaded
(`accept_overrides`); a rank that refuses at start-up marks it `refused` (`refuse_overrides`),
and config.yaml stays byte-identical, so a plain `dodo submit RUN_DIR` resumes the run as it was.
Torch-free: it runs at submit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from dodo.config.errors import ConfigError
from dodo.rundir import RunDir, write_atomic

# Keys a resume may change: how the run is laid out, not what it computes.
RESUME_KEYS = ("cluster.*", "train.micro_batch", "train.grad_accum", "model.moe.ep_size")
PENDING, APPLIED, REFUSED, SUPERSEDED = "pending", "applied", "refused", "superseded"


def check_resume_keys(run_dir: str, overrides: Sequence[str]) -> None:
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    bad = [k for k in keys if not (k.startswith("cluster.") or k in RESUME_KEYS)]
    if bad:
        raise ConfigError(f"{run_dir} is a run directory: its config is fixed, so {_few(bad)} cannot "
                          f"change on resume; allowed there: {', '.join(RESUME_KEYS)} (e.g. to resume on "
                          f"another number of ranks); anything else needs a new run from a job file")


def check_global_batch(run_dir: str, old: Any, new: Any, overrides: Sequence[str]) -> None:
    def batch(c: Any) -> tuple[int, str]:
        t, w = c.train, c.cluster.world_size
        return t.micro_batch * t.grad_accum * w, f"{t.micro_batch} x {t.grad_accum} x {w}"

    (was, was_text), (now, now_text) = batch(old), batch(new)
    if was != now:
        raise ConfigError(f"{run_dir}: resuming with {_few(list(overrides))} changes the global batch "
                          f"train.micro_batch x train.grad_accum x ranks (cluster.nodes x cluster.tasks_per_node) "
                          f"from {was_text} = {was} to {now_text} = {now}; keep it {was} (e.g. scale "
                          f"train.grad_accum or train.micro_batch) so the sample order stays the same")


def check_moe_resume(run_dir: str, old: Any, new: Any, ckpt_world: int | None) -> None:
    """The one place that decides whether an MoE run may resume on another world size or ep_size.

    DeepSpeed's universal checkpoint skips experts; dodo reshards them itself
    (dodo/train/reshard.py), which loads into ZeRO stage 1 or 2 only. What the ranks would refuse
    is refused here, before anything is launched; relax it as the resharding learns more.
    """
    if not new.model.moe.enabled:
        return
    world = new.cluster.world_size
    was_world = ckpt_world if ckpt_world is not None else old.cluster.world_size
    changed = was_world != world or old.model.moe.ep_size != new.model.moe.ep_size
    if changed and new.deepspeed.zero_stage not in (1, 2):
        raise ConfigError(f"{run_dir}: this MoE run's checkpoint was written by {was_world} ranks with "
                          f"model.moe.ep_size={old.model.moe.ep_size}; resuming on {world} ranks with "
                          f"ep_size={new.model.moe.ep_size} reshards the experts, which needs ZeRO stage 1 or 2 "
                          f"(deepspeed.zero_stage is {new.deepspeed.zero_stage}); resume on {was_world} ranks")


def check_resume(run_dir: str, old: Any, new: Any, overrides: Sequence[str], ckpt_world: int | None) -> None:
    """Every check that can refuse a resume; raises ConfigError (one line) naming the fix."""
    check_resume_keys(run_dir, overrides)
    check_global_batch(run_dir, old, new, overrides)
    check_moe_resume(run_dir, old, new, ckpt_world)


# ---------------------------------------------------------------- the overrides record


def overrides_dir(run: RunDir) -> Path:
    return run.job / "overrides"


def _records(run: RunDir) -> list[tuple[int, Path]]:
    found = []
    for path in overrides_dir(run).glob("*.yaml"):
        if path.stem.isdigit():
            found.append((int(path.stem), path))
    return sorted(found)


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, record: dict) -> None:
    write_atomic(path, yaml.safe_dump(record, sort_keys=False))


def record_overrides(run: RunDir, overrides: Sequence[str], changes: Sequence[str]) -> Path | None:
    """Called by `dodo submit RUN_DIR` once every check passed. Earlier pending records are
    superseded (this submission decides); returns the new record, None without overrides."""
    for _, path in _records(run):
        record = _read(path)
        if record.get("state") == PENDING:
            _write(path, {**record, "state": SUPERSEDED})
    if not overrides:
        return None
    numbers = [n for n, _ in _records(run)]
    path = overrides_dir(run) / f"{(numbers[-1] if numbers else 0) + 1}.yaml"
    _write(path, {"overrides": list(overrides), "changes": list(changes), "state": PENDING,
                  "submitted": time.time()})
    return path


def pending_overrides(run: RunDir) -> tuple[Path | None, list[str]]:
    """The newest record still pending, and its overrides."""
    for _, path in reversed(_records(run)):
        record = _read(path)
        if record.get("state") == PENDING:
            return path, [str(o) for o in record.get("overrides", [])]
    return None, []


def load_run_config(run: RunDir) -> Any:
    """What the ranks run: config.yaml plus the pending overrides (config.yaml is not changed)."""
    from dodo.config.loader import load_job

    _, overrides = pending_overrides(run)
    return load_job(run.config, overrides)


def accept_overrides(run: RunDir) -> None:
    """Rank 0, after the checkpoint loaded: the overrides become part of config.yaml."""
    from dodo.config.loader import dump_config

    path, overrides = pending_overrides(run)
    if path is None:
        return
    write_atomic(run.config, dump_config(load_run_config(run)))
    _write(path, {**_read(path), "state": APPLIED, "applied": time.time()})


def refuse_overrides(run: RunDir, reason: str) -> None:
    """A rank refused the resume: mark the record; config.yaml stays as it was."""
    run.update_status(refused=reason[:2000])  # the only change to status.json a refusal makes
    path, _ = pending_overrides(run)
    if path is not None:
        _write(path, {**_read(path), "state": REFUSED, "reason": reason[:2000], "refused": time.time()})


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(i if len(i) <= 80 else i[:77] + "..." for i in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")
