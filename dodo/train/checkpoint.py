"""Checkpoints that are either complete or invisible.

All ranks write into checkpoints/.staging/step_<n>/ (DeepSpeed's trainable-only model and
ZeRO optimizer shards, plus dodo's per-rank RNG state); after a barrier rank 0 writes
dodo_meta.json and publishes the directory with one rename, then points `latest` at it.
A process killed mid-write leaves only staging debris, which the next save clears; resume
takes the newest published step directory.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dodo.rundir import RunDir, read_json, write_atomic, write_json_atomic

_TAG = re.compile(r"^step_(\d{8})$")
META = "dodo_meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed here; the message says why and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    world_size: int

    @property
    def tag(self) -> str:
        return self.path.name


def published(run: RunDir) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first."""
    found = []
    for path in run.checkpoints.glob("step_*"):
        meta = read_json(path / META)
        if _TAG.match(path.name) and meta is not None:
            found.append(CheckpointInfo(path, meta["step"], meta["world_size"]))
    return sorted(found, key=lambda c: c.step)


def latest(run: RunDir) -> CheckpointInfo | None:
    done = published(run)
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, run: RunDir, step: int, client_state: dict[str, Any], keep: int) -> CheckpointInfo:
    """Collective: every rank calls it at the same step."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    staging = run.checkpoints / ".staging"
    tag = tag_for(step)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # debris of a save that was killed
        staging.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state,
                           exclude_frozen_parameters=True)
    torch.save(rng_state(), staging / tag / f"dodo_rank_{rank}.pt")
    _barrier()
    final = run.checkpoints / tag
    if rank == 0:
        write_json_atomic(staging / tag / META, {"step": step, "world_size": world})
        if final.exists():  # re-saving a step (e.g. stop signal right after a periodic save)
            shutil.rmtree(final)
        (staging / tag).rename(final)
        write_atomic(run.checkpoints / "latest", tag + "\n")
        for old in published(run)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    _barrier()
    return CheckpointInfo(final, step, world)


def load(engine, ckpt: CheckpointInfo) -> dict[str, Any]:
    """Restore trainable weights, optimizer, LR schedule and this rank's RNG; returns client state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if ckpt.world_size != world and getattr(engine, "has_moe_layers", False):
        raise CheckpointError(
            f"checkpoint {ckpt.path} of this MoE run was written by {ckpt.world_size} ranks but this run "
            f"has {world}; resume with {ckpt.world_size} ranks. Expert weights are stored per expert, but "
            "ZeRO partitions each expert's optimizer state over its expert-data-parallel group (world "
            "size / model.moe.ep_size ranks) and DeepSpeed's universal checkpoint conversion does not "
            "cover MoE experts, so the optimizer state cannot be re-split")
    if ckpt.world_size != world:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written by {ckpt.world_size} ranks but this run has {world}; "
            f"resume with {ckpt.world_size} ranks (resuming on another world size needs a universal "
            "checkpoint conversion, not supported yet)")
    _, client_state = engine.load_checkpoint(str(ckpt.path.parent), tag=ckpt.tag,
                                             load_module_strict=False, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt.path}")
    set_rng_state(torch.load(ckpt.path / f"dodo_rank_{rank}.pt", weights_only=False))
    return client_state
