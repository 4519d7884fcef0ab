"""DeepSpeed setup: process group, the DeepSpeed config generated from dodo's, the engine."""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Iterable

import torch
from torch import nn

from dodo.cluster.env import DistEnv
from dodo.config.schema import JobConfig
from dodo.distributed.config import deepspeed_config  # noqa: F401 (torch-free, for --dry-run)


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32 on CPU; fp16 (with loss scaling) on V100 / sm_70; bf16 on sm_80+."""
    if requested != "auto":
        if device.type == "cpu" and requested != "fp32":
            raise ValueError(f"train.precision={requested} needs a GPU; use fp32 or auto on CPU")
        if requested == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            raise ValueError("train.precision=bf16 needs sm_80 or newer (V100 is sm_70); use fp16 or auto")
        return requested
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def use_cpu_accelerator() -> None:
    """Point DeepSpeed at the CPU, with its JIT-built ops kept inside this environment.

    On the CPU accelerator DeepSpeed compiles a shared-memory comm op on first use, into
    ~/.cache/torch_extensions by default: two virtual environments on one machine then rebuild
    it in turn (its hash covers their source paths) and a rank starting meanwhile fails.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def build_cpu_ops() -> None:
    """Nothing to build: dodo skips DeepSpeed's CPU comm op (see `skip_cpu_comm_op`), so neither
    `make install` nor a rank compiles anything. Kept for install scripts that still call it."""
    use_cpu_accelerator()
    skip_cpu_comm_op()


def skip_cpu_comm_op() -> None:
    """Never JIT-build DeepSpeed's shared-memory CPU comm op inside a rank.

    DeepSpeed builds it when its torch backend starts, with whichever `ninja` comes first on
    PATH; the venv's ninja and the system's write different command hashes into `.ninja_log`,
    so each switch rebuilt it inside the ranks (43-85 s; 134 s from submit to step 0 measured).
    DeepSpeed uses the op only for `inference_all_reduce`, which dodo never calls, and without it
    that falls back to torch.distributed. Marking it incompatible (DeepSpeed's own switch, read by
    `build_shm_op`) makes start-up independent of PATH: tests/test_perf_startup.py.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(env: DistEnv, timeout_s: float | None = None) -> None:
    """Initialise torch.distributed through DeepSpeed: gloo on CPU, nccl on GPU.

    `timeout_s`: how long a collective may wait for a rank before it raises (the process
    group's timeout; dodo derives it from cluster.hang_timeout_s). None: the backend default."""
    if not torch.cuda.is_available():
        use_cpu_accelerator()
    import datetime

    import deepspeed

    env.export()
    skip_cpu_comm_op()
    extra = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, **extra)


def lr_lambda(cfg: JobConfig):
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: nn.Module, cfg: JobConfig) -> list[dict[str, Any]]:
    """Trainable parameters only; a trainable image encoder gets its own (small) lr; a model with
    ``lr_scale(name) -> float`` gets one group per multiplier (train.lr x it; sorted, so the
    groups' order, which checkpoints' optimizer state follows, is fixed)."""
    encoder = getattr(model, "image_encoder", None)
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    lr_scale = getattr(model, "lr_scale", None)  # a family's per-parameter lr multiplier (VLMo's new heads)
    by_scale: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in encoder_ids:
            by_scale.setdefault(float(lr_scale(name)) if lr_scale else 1.0, []).append(p)
    groups = [{"params": ps, "lr": cfg.train.lr * s} for s, ps in sorted(by_scale.items())] or \
        [{"params": [], "lr": cfg.train.lr}]
    enc = [p for p in model.parameters() if p.requires_grad and id(p) in encoder_ids]
    if enc:
        groups.append({"params": enc, "lr": cfg.model.image_encoder.lr})
    return groups


def _exclude_tied_frozen_aliases() -> None:
    """Make DeepSpeed's exclude_frozen_parameters drop tied aliases of frozen weights too.

    DeepSpeed filters the state dict with `module.named_parameters()`, which lists a tied
    parameter once, so the alias (GPT-2/GPT-J's `lm_head.weight`, tied to the frozen input
    embedding: 206M parameters for GPT-J) stayed in every checkpoint. Wrapping the class method
    also covers its MoE checkpoint path, which calls `DeepSpeedEngine.module_state_dict` directly.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine.module_state_dict
    if getattr(original, "_dodo_wrapped", False):
        return

    def module_state_dict(self, destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        sd = original(self, destination=destination, prefix=prefix, keep_vars=keep_vars,
                      exclude_frozen_parameters=exclude_frozen_parameters)
        if exclude_frozen_parameters and sd is not None:
            for name, p in self.module.named_parameters(prefix=prefix, remove_duplicate=False):
                if not p.requires_grad:
                    sd.pop(name, None)
        return sd

    module_state_dict._dodo_wrapped = True
    DeepSpeedEngine.module_state_dict = module_state_dict


def has_moe_parameters(params: Iterable[nn.Parameter]) -> bool:
    """Whether any parameter is a DeepSpeed MoE expert parameter (tagged by dodo.moe.layer)."""
    from deepspeed.moe.utils import is_moe_param

    return any(is_moe_param(p) for p in params)


def moe_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MoE: expert parameters (tagged allreduce=False by dodo.moe.layer) move to their own groups
    ({'moe': True, 'name': 'ep_size_<n>'}), which ZeRO-1/2 reduce and partition over the
    expert-data-parallel group; DeepSpeed refuses an MoE model without them. Else unchanged."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    if not has_moe_parameters(p for g in groups for p in g["params"]):
        return groups
    named = [{**g, "name": g.get("name", f"group_{i}")} for i, g in enumerate(groups)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]


def create_engine(model: nn.Module, cfg: JobConfig, env: DistEnv, precision: str,
                  load_universal: bool = False):
    """Returns (engine, lr_scheduler). Only trainable parameters reach the optimizer;
    `load_universal`: the engine will load a universal checkpoint."""
    import deepspeed

    _exclude_tied_frozen_aliases()
    groups = moe_param_groups(param_groups(model, cfg))
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, env.world_size, precision, load_universal))
    return engine, scheduler
