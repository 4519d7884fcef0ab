"""Shared loading steps: read a checkpoint file, check its shapes, build without an fp32 copy.

Memory: a frozen tower is built on the meta device (no storage), then its parameters are
*assigned* the checkpoint's tensors (``load_state_dict(assign=True)``) and cast once to the
target dtype, so a rank holds one copy of the weights in the target dtype plus, transiently,
the checkpoint as stored. Safetensors files are memory-mapped. docs/benchmarks.md has the
measured peaks.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from dodo.config.errors import ConfigError
from dodo.models.sources.config import SourceConfig, sniff_format

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, device: Optional[torch.device] = None) -> torch.dtype:
    """``auto``: bf16 on compute capability 8.0+, fp16 on 7.x (V100), fp32 on CPU."""
    if name != "auto":
        return _DTYPES[name]
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def read_checkpoint(path: str, key: str = "source") -> dict[str, torch.Tensor]:
    """A flat state dict from a .safetensors, torch.save (.pt/.bin/.pth) or TorchScript file.

    OpenAI's CLIP .pt files are TorchScript archives; their state_dict() is the plain layout
    (plus three int entries, dropped). {"state_dict": ...} wrappers and DDP's "module." are unwrapped.
    """
    fmt = sniff_format(path)
    if fmt == "safetensors":
        from safetensors.torch import load_file
        return load_file(path)  # memory-mapped
    if fmt not in ("zip", "pickle"):
        raise ConfigError(f"{key}.path={path!r} is not a checkpoint file (found {fmt} data)")
    try:
        if is_torchscript(path):  # tensors only are read from it; its code is never run
            obj = torch.jit.load(path, map_location="cpu")
        else:  # weights_only: a pickle that holds anything but tensors is refused, not executed
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == "zip")
    except Exception as err:  # noqa: BLE001 - unpickling errors of every kind mean "not a checkpoint"
        raise ConfigError(f"{key}.path={path!r} could not be read as a checkpoint: "
                          f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
    if isinstance(obj, torch.jit.ScriptModule):
        obj = {k: v for k, v in obj.state_dict().items()
               if k not in ("input_resolution", "context_length", "vocab_size")}
    for wrapper in ("state_dict", "model", "module"):  # {"model": ...}: MAE / DeiT; "module": DeepSpeed
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{key}.path={path!r} holds a {type(obj).__name__}, not a state dict of tensors")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def is_torchscript(path: str) -> bool:
    if sniff_format(path) != "zip":
        return False
    import zipfile
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def check_shapes(model: nn.Module, sd: Mapping[str, torch.Tensor], key: str, path: str) -> None:
    """Every checkpoint tensor matches the architecture: the first mismatch, missing or unexpected
    tensor is named (a load_state_dict error lists them all, in a paragraph)."""
    expected = model.state_dict(keep_vars=True)  # meta tensors: shapes only
    persistent = set(expected)
    transient = non_persistent_buffers(model)  # TorchScript archives carry these too; ignored
    for name, tensor in sd.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise ConfigError(f"{key}.path={path!r}: tensor {name} has shape {tuple(tensor.shape)}, but "
                              f"the architecture ({model.__class__.__name__}) expects {tuple(expected[name].shape)}; "
                              "the weights are of another architecture or size: check arch / arch_kwargs")
    missing = [k for k in persistent if k not in sd]
    unexpected = [k for k in sd if k not in expected and k not in transient]
    if missing or unexpected:
        what = (f"lacks tensor {missing[0]} ({len(missing)} missing)" if missing
                else f"has tensor {unexpected[0]} the architecture does not ({len(unexpected)} unexpected)")
        raise ConfigError(f"{key}.path={path!r} {what}; the weights are of another architecture: "
                          "check arch / arch_kwargs")


def non_persistent_buffers(model: nn.Module) -> set[str]:
    return {f"{n}.{b}" if n else b for n, m in model.named_modules() for b in m._non_persistent_buffers_set}


def build_and_load(make: Callable[[], nn.Module], sd: dict[str, torch.Tensor], dtype: torch.dtype,
                   key: str, path: str) -> nn.Module:
    """Construct on the meta device, check shapes, assign the checkpoint's tensors, cast to dtype.

    Modules with non-persistent buffers (open_clip's causal text mask) cannot be restored from a
    checkpoint; for those the build falls back to constructing on CPU in the target dtype.
    """
    with torch.device("meta"):
        model = make()
    check_shapes(model, sd, key, path)
    non_persistent = non_persistent_buffers(model)
    if non_persistent:
        sd = {k: v for k, v in sd.items() if k not in non_persistent}
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype if dtype != torch.float16 else torch.float32)
        try:
            model = make()
        finally:
            torch.set_default_dtype(default)
        model.load_state_dict(sd, strict=True)
    else:
        model.load_state_dict(sd, strict=True, assign=True)
    return model.to(dtype)


def freeze_eval(model: nn.Module) -> nn.Module:
    """A frozen tower: eval mode (dropout off, BatchNorm statistics fixed), no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def require_file(path: str, key: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{key}.path={path!r} does not exist; point it at a local copy of the weights")
