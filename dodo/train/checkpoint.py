"""Checkpoints that are either complete or invisible.

All ranks write into checkpoints/.staging/step_<n>/ (DeepSpeed's trainable-only model and
ZeRO optimizer shards, plus dodo's per-rank RNG state); after a barrier rank 0 writes
dodo_meta.json and publishes the directory with one rename, then points `latest` at it.
A process killed mid-write leaves only staging debris, which the next save clears; resume
takes the newest published step directory.

Resuming on another world size (non-MoE): rank 0 converts the checkpoint once into DeepSpeed's
universal format under checkpoints/universal/<tag>/ (written under a temporary name, renamed
when complete), and the engine loads it with `"checkpoint": {"load_universal": true}`.
An MoE run on another world size or model.moe.ep_size: rank 0 reshards it once into
checkpoints/resharded/<tag>/ (dodo/train/reshard.py), published the same way, loaded by dodo.

Every checkpoint carries dodo_checksums.json (sha256 of each trainable tensor, logical names);
every resume compares the restored tensors with it and stops on the first mismatch.
"""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dodo.rundir import RunDir, read_json, write_atomic, write_json_atomic
from dodo.train import reshard
# Torch-free, so that `dodo submit` can read them: re-exported here.
from dodo.train.checkpoint_index import _TAG, META, CheckpointInfo, latest, published, tag_for  # noqa: F401

UNIVERSAL = "universal"
log = logging.getLogger("dodo.train")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed here; the message says why and what to do."""


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
    sums = reshard.checksums(engine.module)  # collective; logical names, so any later layout can check
    _barrier()
    final = run.checkpoints / tag
    if rank == 0:
        write_json_atomic(staging / tag / reshard.CHECKSUMS, sums)
        meta = {"step": step, "world_size": world, "zero_stage": engine.zero_optimization_stage()}
        ep = _ep_size(engine.module)
        if ep is not None:
            meta["ep_size"] = ep
        write_json_atomic(staging / tag / META, meta)
        if final.exists():  # re-saving a step (e.g. stop signal right after a periodic save)
            shutil.rmtree(final)
        (staging / tag).rename(final)
        write_atomic(run.checkpoints / "latest", tag + "\n")
        for old in published(run)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    _barrier()
    return CheckpointInfo(final, step, world)


def _convert(run: RunDir, ckpt: CheckpointInfo) -> Path:
    """Rank 0: DeepSpeed's universal checkpoint of `ckpt`, converted once (reused when complete)."""
    root = run.checkpoints / UNIVERSAL
    out = root / ckpt.tag
    if not out.is_dir():  # the rename below publishes it complete, or not at all
        tmp = root / f".tmp_{ckpt.tag}"
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt.path),
               "--output_folder", str(tmp), "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"converting checkpoint {ckpt.path} ({ckpt.world_size} ranks) to a universal checkpoint "
                f"failed ({' '.join(cmd[1:4])} exited {proc.returncode}); resume with {ckpt.world_size} "
                f"ranks instead. Its output ends:\n{(proc.stdout + proc.stderr)[-2000:]}")
        write_json_atomic(tmp / META, {"step": ckpt.step, "world_size": ckpt.world_size, "source": ckpt.tag})
        tmp.rename(out)
    for other in root.iterdir():  # only the newest conversion is ever loaded
        if other.is_dir() and other.name != ckpt.tag:
            shutil.rmtree(other, ignore_errors=True)
    write_atomic(root / "latest_universal", ckpt.tag + "\n")  # where DeepSpeed looks for the tag
    return out


def prepare_universal(run: RunDir, ckpt: CheckpointInfo) -> Path:
    """Collective: rank 0 converts `ckpt` (see _convert), every rank gets its path or the error."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    result: list[Any] = [None]
    if rank == 0:
        try:
            result[0] = _convert(run, ckpt)
        except CheckpointError as err:
            result[0] = err
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], CheckpointError):
        raise result[0]
    return Path(result[0])


def _ep_size(module) -> int | None:
    """model.moe.ep_size of a built model (its DeepSpeed MoE layers), None without MoE layers."""
    from deepspeed.moe.layer import MoE

    return next((m.ep_size for m in module.modules() if isinstance(m, MoE)), None)


def _rank0(work) -> Any:
    """Collective: rank 0 runs work() (a CheckpointError / ReshardError is passed on too), every
    rank gets its result or raises its error."""
    result: list[Any] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result[0] = work()
        except (CheckpointError, reshard.ReshardError) as err:
            result[0] = CheckpointError(str(err))
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], CheckpointError):
        raise result[0]
    return result[0]


def prepare_resume(run: RunDir, ckpt: CheckpointInfo | None, model, ep_size: int) -> Path | None:
    """Collective, before the engine exists: None when `ckpt` loads as written; else the converted
    copy to load: universal (dense model, another world size, `is_universal`) or resharded (an MoE
    model on another world size or ep_size)."""
    from dodo.distributed.engine import has_moe_parameters

    if ckpt is None:
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not has_moe_parameters(model.parameters()):
        return prepare_universal(run, ckpt) if ckpt.world_size != world else None
    was_ep = (read_json(ckpt.path / META) or {}).get("ep_size")
    if was_ep is None:  # a checkpoint from before dodo recorded it: its ZeRO group name says
        was_ep = _rank0(lambda: reshard.saved_ep_size(ckpt.path))
    if ckpt.world_size == world and was_ep in (None, ep_size):
        return None
    return Path(_rank0(lambda: reshard.reshard(run, ckpt, ckpt.world_size)))


def is_universal(converted: Path | None) -> bool:
    return converted is not None and converted.parent.name == UNIVERSAL


def load(engine, ckpt: CheckpointInfo, universal: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Restore trainable weights, optimizer, LR schedule and this rank's RNG; returns client state.
    Collective. Then every restored trainable tensor is checked against the checkpoint's checksums.

    `universal`: the converted checkpoint (prepare_resume) when the world size (MoE: or ep_size)
    changed; a rank the checkpoint had no RNG state for seeds itself with seed * 1000 + rank + step.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if ckpt.world_size != world and universal is None:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written by {ckpt.world_size} ranks but this run has {world}; "
            f"resume with {ckpt.world_size} ranks, or through its conversion (Trainer does: prepare_resume)")
    if universal is not None and not is_universal(universal):
        try:
            client_state = reshard.load_logical(engine, universal)
        except reshard.ReshardError as err:
            raise CheckpointError(str(err)) from None
    else:
        source = universal if universal is not None else ckpt.path
        _, client_state = engine.load_checkpoint(str(source.parent), tag=source.name,
                                                 load_module_strict=False, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {source}")
        if "step" not in client_state:  # a conversion without dodo's client state: take the original's
            client_state = torch.load(ckpt.path / "mp_rank_00_model_states.pt", map_location="cpu",
                                      weights_only=False)
    verify(engine, ckpt)
    rng = ckpt.path / f"dodo_rank_{rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))
    else:  # a rank the checkpoint did not have
        torch.manual_seed(seed * 1000 + rank + client_state["step"])
    return client_state


def verify(engine, ckpt: CheckpointInfo) -> int:
    """Collective: the restored trainable tensors against the checksums saved with `ckpt` (logical,
    unsharded tensors, so it holds across world sizes); the first mismatch raises one line naming
    the tensor. Returns how many were checked (0: a checkpoint from before checksums existed)."""
    expected = read_json(ckpt.path / reshard.CHECKSUMS)
    got = reshard.checksums(engine.module)
    mine = reshard.master_problem(engine)  # the optimizer's fp32 copy, restored from the ZeRO shards
    masters: list[Any] = [mine]
    if dist.is_initialized():
        masters = [None] * dist.get_world_size()
        dist.all_gather_object(masters, mine)
    damaged = "; the checkpoint is damaged: move it aside to resume from the one before"
    problem = reshard.compare(expected, got, f"resuming from {ckpt.path}") if expected is not None else None
    if problem:
        raise CheckpointError(problem + damaged)
    master = next((m for m in masters if m), None)
    if master:
        raise CheckpointError(f"resuming from {ckpt.path}: {master}{damaged}")
    if expected is None:
        return 0
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info("checksums of all %d trainable tensors match %s", len(expected), ckpt.path / reshard.CHECKSUMS)
    return len(expected)
