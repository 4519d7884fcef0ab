"""Adapter weights alone: save / load, merge / unmerge, and the WiSE interpolation.

The adapter state of a model is every trainable parameter plus the buffers of adapter
modules (R-Adapter's EMA weights); the frozen base is never written.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if getattr(m, "is_dodo_adapter", False)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and adapter buffers, detached copies keyed by full name."""
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for prefix, module in adapter_modules(model):
        for n, b in module.named_buffers(recurse=False):
            state[f"{prefix}.{n}" if prefix else n] = b.detach().clone()
    return state


def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter state as safetensors, atomically (a temp file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in adapter_state_dict(model).items()}, str(tmp))
    os.replace(tmp, path)
    return path


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """Copy ``state`` into the model's adapter tensors; the key sets must match exactly."""
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model's adapters: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}; build the model with the same "
                         "model.adapter config as the run that saved it")
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    with torch.no_grad():
        for k, v in state.items():
            if tensors[k].shape != v.shape:
                raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects "
                                 f"{tuple(tensors[k].shape)}")
            tensors[k].copy_(v)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    load_adapter_state(model, load_file(str(path)), str(path))


def merge_adapters(model: nn.Module) -> int:
    """Fold every linear adapter into its base weights; error on adapters that cannot merge."""
    modules = adapter_modules(model)
    stuck = [n for n, m in modules if not hasattr(m, "merge") and type(m).__name__ != "FiLMCondition"]
    if stuck:
        raise ValueError(f"adapters {stuck[:3]} are not linear in the input and cannot be merged "
                         "(bottleneck, prefix and FiLM adapters stay separate modules)")
    merged = 0
    for _, m in modules:
        if hasattr(m, "merge"):
            m.merge()
            merged += 1
    return merged


def unmerge_adapters(model: nn.Module) -> None:
    for _, m in adapter_modules(model):
        if hasattr(m, "unmerge"):
            m.unmerge()


def zero_shot_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter state with every adapter's output parameters at zero: the frozen model.

    Interpolating from it to the adapted state (``wise_state``) scales each adapter's
    contribution: exactly alpha times the update for LoRA, R-Adapter and bottleneck adapters.
    """
    state = adapter_state_dict(model)
    for prefix, module in adapter_modules(model):
        for n in getattr(module, "output_params", ()):
            key = f"{prefix}.{n}" if prefix else n
            if key in state:
                state[key] = torch.zeros_like(state[key])
        if hasattr(module, "ema_scale"):
            state[f"{prefix}.ema_scale" if prefix else "ema_scale"].zero_()
    return state


def wise_state(zero_shot: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
               alpha: float) -> dict[str, torch.Tensor]:
    """theta = (1 - alpha) theta_zero_shot + alpha theta_tuned, key by key."""
    if zero_shot.keys() != tuned.keys():
        raise ValueError("WiSE needs two states of the same model (the key sets differ)")
    def lerp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # at least fp32 (half inputs), fp64 kept
        dt = torch.promote_types(b.dtype, torch.float32)
        return torch.lerp(a.to(dt), b.to(dt), alpha).to(b.dtype)  # weight 0 / 1: a / b exactly
    return {k: lerp(zero_shot[k], tuned[k]) if tuned[k].is_floating_point() else tuned[k] for k in tuned}
