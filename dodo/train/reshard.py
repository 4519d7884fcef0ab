"""Elastic MoE resume: an MoE checkpoint resharded onto another world size or model.moe.ep_size.

DeepSpeed's universal checkpoint skips MoE experts (DeepSpeed issues #5716, #8147), and a
ZeRO-1/2 MoE checkpoint is laid out by the world size W and ep_size e that wrote it:

    layer_<l>_expert_<g>_mp_rank_00_model_states.pt   one file per *global* expert g (weights)
    mp_rank_00_model_states.pt                        non-expert trainable weights, LR schedule
    zero_pp_rank_<r>_mp_rank_00_optim_states.pt       rank r's ZeRO partitions: per optimizer
        group a flat fp32 master partition and Adam's exp_avg / exp_avg_sq of the same length;
        the dense group is split over all W ranks, the expert group "ep_size_<e>" over the
        expert-data-parallel group of rank r (ranks r % e, r % e + e, ...), holding the local
        experts of expert-parallel rank r % e under *local* names (deepspeed_experts.<i>).

`logical_state` undoes that layout: every trainable tensor, fp32 master, exp_avg and
exp_avg_sq whole, under its logical name (global expert index g = (r % e) * E/e + i). Rank 0
writes it once to checkpoints/resharded/<tag>/logical.pt (temporary name, one rename, after its
weights matched the checksums saved with the checkpoint), and every rank of the new layout
loads it with `load_logical`: each rank picks its own experts, and writes its ZeRO fragments
through the parameters' hp mappings, as DeepSpeed's universal loader does for dense tensors.
Written here rather than by extending ds_to_universal because that converter keys tensors by
the rank-local parameter name, which is the same name for different experts on different ranks.

Checksums (`checksums`): sha256 of each trainable tensor's bytes under its logical name, written
with every checkpoint and compared after every resume, so a world-size change is verified on the
unsharded tensors. torch is imported inside functions: `dodo submit` imports this module.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from dodo.rundir import RunDir, read_json, write_json_atomic

EXPERTS = ".deepspeed_moe.experts.deepspeed_experts."
RESHARDED = "resharded"
LOGICAL = "logical.pt"
CHECKSUMS = "dodo_checksums.json"
_LOCAL = re.compile(r"^(.*" + re.escape(EXPERTS) + r")(\d+)(\..*)$")


class ReshardError(RuntimeError):
    """Raised as dodo.train.checkpoint.CheckpointError by the callers (one line, names the fix)."""


# ------------------------------------------------------------------ names and checksums


def _global_name(name: str, ep_rank: int, num_local: int) -> str:
    m = _LOCAL.match(name)
    return f"{m.group(1)}{ep_rank * num_local + int(m.group(2))}{m.group(3)}" if m else name


def logical_names(module) -> dict[str, tuple[str, str | None]]:
    """This rank's trainable parameter name -> (logical name, expert group name or None)."""
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    layers = {}
    for prefix, m in module.named_modules():
        if isinstance(m, MoE):
            ep_rank = groups._get_expert_parallel_rank(m.expert_group_name) if dist.is_initialized() else 0
            layers[f"{prefix}{EXPERTS}"] = (ep_rank, m.num_local_experts, m.expert_group_name)
    out = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        m = _LOCAL.match(name)
        if m and m.group(1) in layers:
            ep_rank, num_local, group = layers[m.group(1)]
            out[name] = (_global_name(name, ep_rank, num_local), group)
        else:
            out[name] = (name, None)
    return out


def digest(t) -> str:
    """dtype, shape and sha256 of the bytes: equal strings mean bitwise-equal tensors."""
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}:{hashlib.sha256(data).hexdigest()}"


def checksums(module) -> dict[str, str]:
    """Collective: logical name -> digest of every trainable tensor, the same dict on every rank.
    Dense tensors are hashed by rank 0, an expert by the first rank of its expert-data-parallel
    group (the ranks holding it hold identical copies under ZeRO-1/2)."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    on = dist.is_initialized()
    rank = dist.get_rank() if on else 0
    mine = {}
    names = logical_names(module)
    for name, p in module.named_parameters():
        if name not in names:
            continue
        logical, group = names[name]
        owner = (groups._get_expert_data_parallel_rank(group) == 0) if (group and on) else rank == 0
        if owner:
            mine[logical] = digest(p)
    if not on:
        return mine
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in sorted(part.items())}


def compare(expected: dict[str, str], got: dict[str, str], where: str) -> str | None:
    """The first difference as one line, or None."""
    for name in sorted(expected):
        if name not in got:
            return f"{where}: trainable tensor {name} was saved but is not in the resumed model"
        if got[name] != expected[name]:
            return (f"{where}: trainable tensor {name} does not match the checksum saved with the checkpoint "
                    f"(saved {expected[name][-16:]}, restored {got[name][-16:]})")
    extra = sorted(set(got) - set(expected))
    if extra:
        return f"{where}: trainable tensor {extra[0]} of the resumed model has no checksum in the checkpoint"
    return None


def master_problem(engine) -> str | None:
    """This rank's ZeRO fp32 master fragments against the weights they belong to, where both are
    fp32 (bit for bit: ZeRO copies the master into the weight after every step); the first
    difference as one line, or None. Local: no communication."""
    import torch

    opt = engine.optimizer
    if not hasattr(opt, "bit16_groups"):
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    logical = logical_names(engine.module)
    for group in opt.bit16_groups:
        for lp in group:
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None or lp.dtype != torch.float32:
                continue
            addr, hp = mapping.lp_fragment_address, mapping.get_hp_fragment()
            if not torch.equal(lp.detach().reshape(-1).narrow(0, addr.start, addr.numel), hp.to(lp.device)):
                name = logical.get(names.get(id(lp), ""), (names.get(id(lp), "?"),))[0]
                return f"the fp32 master copy of trainable tensor {name} differs from its weight"
    return None


# ------------------------------------------------------------------ reading a ZeRO-1/2 MoE checkpoint


def saved_ep_size(ckpt: Path) -> int | None:
    """model.moe.ep_size that wrote `ckpt` (dodo_meta.json; older checkpoints: the ZeRO group name)."""
    import torch

    meta = read_json(ckpt / "dodo_meta.json") or {}
    if "ep_size" in meta:
        return meta["ep_size"]
    shard = ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if not shard.exists():
        return None
    sd = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    names = [g.get("name", "") for g in sd["base_optimizer_state"]["param_groups"] if g.get("moe")]
    return int(names[0].rsplit("_", 1)[1]) if names else None


def logical_state(ckpt: Path, world: int) -> dict[str, Any]:
    """The whole trainable state of a ZeRO-1/2 (MoE or dense) checkpoint written by `world` ranks,
    under logical names: {"module": {name: tensor}, "fp32"/"exp_avg"/...: {name: tensor},
    "step", "param_groups", "global_state", "lr_scheduler", "engine", "client_state"}."""
    import torch

    load = lambda p: torch.load(p, map_location="cpu", weights_only=False)  # noqa: E731
    model = load(ckpt / "mp_rank_00_model_states.pt")
    module = dict(model["module"])
    for f in sorted(ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        module.update(load(f))  # already keyed by global expert index
    files = [ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    if not all(f.exists() for f in files):
        raise ReshardError(f"{ckpt} has no ZeRO optimizer shards for its {world} ranks (written with "
                           "deepspeed.zero_stage 0?); elastic MoE resume reshards ZeRO-1/2 checkpoints only")
    shards = [load(f)["optimizer_state_dict"] for f in files]
    if any("param_slice_mappings" not in s for s in shards):
        raise ReshardError(f"{ckpt}: its ZeRO shards have no param_slice_mappings (DeepSpeed too old)")
    base = shards[0]["base_optimizer_state"]
    groups_meta = base["param_groups"]
    out: dict[str, Any] = {"module": module, "fp32": {}}
    steps = []
    for i, group in enumerate(groups_meta):
        # Partition sets of this group: (expert-parallel rank or None, ranks in partition order).
        if group.get("moe"):
            ep = int(group["name"].rsplit("_", 1)[1])
            sets = [(j, list(range(j, world, ep))) for j in range(ep)]
        else:
            sets = [(None, list(range(world)))]
        shapes = model["param_shapes"][i]  # local name -> shape, in the group's flat order
        num_local = 1 + max((int(m.group(2)) for m in map(_LOCAL.match, shapes) if m), default=-1)
        for ep_rank, ranks in sets:
            pieces: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
            for r in ranks:
                sd = shards[r]
                fp32 = sd["single_partition_of_fp32_groups"][i]
                flat = {"fp32": fp32}
                state = sd["base_optimizer_state"]["state"]
                state = state[i] if i in state else state[list(state)[i]]
                for key, value in state.items():  # Adam's moments: padded partition length
                    if torch.is_tensor(value) and value.dim() == 1 and value.numel() >= fp32.numel():
                        flat[key] = value
                    elif key == "step":
                        steps.append(value)
                for name, frag in sd["param_slice_mappings"][i].items():
                    for key, t in flat.items():
                        pieces[name][key].append(t.narrow(0, frag.start, frag.numel))
            for name, shape in shapes.items():
                logical = _global_name(name, ep_rank, num_local) if ep_rank is not None else name
                for key, frags in pieces[name].items():
                    out.setdefault(key, {})[logical] = torch.cat(frags).view(tuple(shape)).clone()
    if len({float(s) for s in steps}) > 1:
        raise ReshardError(f"{ckpt}: optimizer step counts differ between ZeRO shards: "
                           f"{sorted(set(map(float, steps)))}")
    keep = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "ds_version")
    out.update(step=steps[0] if steps else None,
               param_groups=[{k: v for k, v in g.items() if k != "params"} for g in groups_meta],
               global_state={k: shards[0][k] for k in keep if k in shards[0]},
               lr_scheduler=model.get("lr_scheduler"),
               engine={k: model.get(k) for k in ("global_steps", "global_samples", "skipped_steps")},
               client_state={k: v for k, v in model.items() if k in ("step", "sampler", "history", "dodo_version")})
    return out


def verify_logical(state: dict[str, Any], ckpt: Path) -> None:
    """Rank 0, before publishing: the unsharded weights match the checksums saved with `ckpt`, and
    fp32 weights match their fp32 master copies bit for bit (catches a damaged optimizer shard)."""
    expected = read_json(ckpt / CHECKSUMS)
    if expected is not None:
        got = {k: digest(state["module"][k]) for k in expected if k in state["module"]}
        problem = compare(expected, got, f"checkpoint {ckpt}")
        if problem:
            raise ReshardError(problem + "; nothing was resharded")
    for name, master in state["fp32"].items():
        weight = state["module"].get(name)
        if weight is None:
            raise ReshardError(f"checkpoint {ckpt}: optimizer state for {name} but no weight; nothing was resharded")
        if weight.dtype == master.dtype and digest(weight) != digest(master):
            raise ReshardError(f"checkpoint {ckpt}: the fp32 master copy of {name} in the ZeRO shards differs "
                               "from its saved weight; the checkpoint is damaged, nothing was resharded")


def reshard(run: RunDir, ckpt, world_then: int) -> Path:
    """Rank 0: checkpoints/resharded/<tag>/logical.pt from `ckpt`, made once, published by a rename."""
    import torch

    root = run.checkpoints / RESHARDED
    out = root / ckpt.tag
    if not (out / LOGICAL).exists():
        tmp = root / f".tmp_{ckpt.tag}"
        shutil.rmtree(tmp, ignore_errors=True)
        state = logical_state(ckpt.path, world_then)
        verify_logical(state, ckpt.path)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / LOGICAL)
        write_json_atomic(tmp / "dodo_meta.json", {"step": ckpt.step, "world_size": world_then, "source": ckpt.tag})
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    for other in root.iterdir():  # only the newest reshard is ever loaded
        if other.name != ckpt.tag:
            shutil.rmtree(other, ignore_errors=True)
    return out


# ------------------------------------------------------------------ loading into a new layout


def load_logical(engine, path: Path) -> dict[str, Any]:
    """Every rank: restore weights, fp32 masters, Adam moments and step, scalar optimizer settings,
    loss scaler and LR schedule from `path`/logical.pt into a fresh ZeRO-1/2 engine; returns the
    client state. This rank's experts come from their global indices (logical_names)."""
    import torch
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    # Mapped, not read: a rank touches only its own experts' and fragments' pages.
    state = torch.load(path / LOGICAL, map_location="cpu", weights_only=False, mmap=True)
    opt = engine.optimizer
    if not hasattr(opt, "single_partition_of_fp32_groups"):
        raise ReshardError(f"elastic MoE resume loads into ZeRO stage 1 or 2 only (this engine's optimizer is "
                           f"{type(opt).__name__}); resume with the world size and model.moe.ep_size that wrote it")
    names = logical_names(engine.module)
    by_id = {id(p): names[n][0] for n, p in engine.module.named_parameters() if n in names}
    missing = sorted({v for v in by_id.values()} - set(state["module"]))
    if missing:
        raise ReshardError(f"{path}: no saved tensor {missing[0]} for this model (a different model config?)")
    with torch.no_grad():
        for p_id, p in ((id(p), p) for p in engine.module.parameters()):
            if p_id in by_id:
                p.data.copy_(state["module"][by_id[p_id]].to(p.device, p.dtype))
    keys = [k for k in state if k not in ("module", "fp32", "step", "param_groups", "global_state",
                                          "lr_scheduler", "engine", "client_state")]
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(opt.optimizer.param_groups) or any(
            bool(a.get("moe")) != bool(b.get("moe")) for a, b in zip(saved_groups, opt.optimizer.param_groups)):
        raise ReshardError(f"{path}: the optimizer groups differ from this run's (dense / expert split)")
    for i, group in enumerate(opt.optimizer.param_groups):
        hp = opt.single_partition_of_fp32_groups[i]
        for lp in opt.bit16_groups[i]:
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:
                continue
            name, addr = by_id[id(lp)], mapping.lp_fragment_address
            frag = lambda t: t.reshape(-1).narrow(0, addr.start, addr.numel)  # noqa: E731
            mapping.get_hp_fragment().data.copy_(frag(state["fp32"][name]).to(hp.device))
            mapping.optim_fragment = {k: frag(state[k][name]).to(hp.device).clone() for k in keys}
        if state["step"] is not None:
            opt.optimizer.state[hp]["step"] = state["step"].clone() if torch.is_tensor(state["step"]) else state["step"]
        map_to_flat_opt_states(hp, opt.bit16_groups[i], opt.optimizer.state, keys)
        for k, v in saved_groups[i].items():
            if k not in ("params", "name"):
                group[k] = v
    if state["global_state"]:
        opt._load_global_state(state["global_state"])
    if state["lr_scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for k, v in state["engine"].items():
        if v is not None:
            setattr(engine, k, v)
    return state["client_state"]
