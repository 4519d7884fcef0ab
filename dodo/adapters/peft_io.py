"""Adapters to and from PEFT's format, and merged Hugging Face exports.

PEFT's on-disk layout (what ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained``
reads), written here with PEFT's own key names, no PEFT import needed:

    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout",
                                "target_modules": [full module names], "fan_in_fan_out", ...}
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight  (r, in)
                               base_model.model.<module>.lora_B.weight  (out, r)

Which dodo adapters PEFT can express: LoRA only. Bottleneck adapters (Houlsby / MAGMA), FiLM,
MAM and R-Adapter have no PEFT type; PEFT's prefix tuning feeds past_key_values from a prompt
encoder with another parametrisation than dodo's per-layer PrefixKV, so it is not converted
either. Those are refused with the reason, and ``merged`` covers what can be folded into the
base weights (LoRA; R-Adapter, which is linear too).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dodo.adapters.config import LoRAConfig
from dodo.adapters.lora import LoRALinear, is_linear

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class PeftFormatError(ValueError):
    """An adapter that cannot be expressed in (or read from) PEFT's format; one line."""


def _adapters(root: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in root.named_modules() if getattr(m, "is_dodo_adapter", False)}


def export_peft(root: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str = "",
                task_type: str = "CAUSAL_LM") -> Path:
    """Write root's LoRA adapters as a PEFT adapter directory; names are relative to ``root``
    (the Hugging Face model that PEFT will wrap: the LM, a CLIP model...)."""
    adapters = _adapters(root)
    other = sorted({type(m).__name__ for m in adapters.values() if not isinstance(m, LoRALinear)})
    if other:
        raise PeftFormatError(f"PEFT has no adapter type for {', '.join(other)} (only LoRA converts); "
                              "use `dodo export --format merged` where the adapter can be merged")
    if not adapters:
        raise PeftFormatError("the model has no LoRA adapters to export")
    first = next(iter(adapters.values()))
    r, scaling = first.r, first.scaling
    if any(m.r != r or m.scaling != scaling for m in adapters.values()):
        raise PeftFormatError("the LoRA adapters differ in rank or scaling; PEFT's config holds one of each")
    if any(m.merged for m in adapters.values()):
        raise PeftFormatError("the LoRA adapters are merged into the base weights; unmerge before exporting")
    fan_in_fan_out = {isinstance(m.base, Conv1D) for m in adapters.values()}
    if len(fan_in_fan_out) > 1:
        raise PeftFormatError("the adapted layers mix Conv1D and Linear; PEFT's fan_in_fan_out is one flag")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": scaling * r, "lora_dropout": dropout, "bias": "none",
        "target_modules": sorted(adapters), "fan_in_fan_out": fan_in_fan_out.pop(),
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    tensors = {}
    for name, m in adapters.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous().cpu()
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_peft_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise PeftFormatError(f"{adapter_dir} has no {CONFIG_FILE}: not a PEFT adapter directory")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise PeftFormatError(f"{path}: peft_type={cfg.get('peft_type')!r}; dodo reads LORA adapters only")
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern",
                               "layers_to_transform") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']}")
    if unsupported:
        raise PeftFormatError(f"{path}: {', '.join(unsupported)} has no dodo LoRA equivalent")
    return cfg


def load_peft(root: nn.Module, adapter_dir: str | os.PathLike) -> list[str]:
    """Wrap root's target modules in dodo LoRALinear with the adapter's weights; returns their names.
    Module names in the file are relative to ``root`` (PEFT's base model)."""
    cfg = read_peft_config(adapter_dir)
    weights_path = Path(adapter_dir) / WEIGHTS_FILE
    if weights_path.is_file():
        from safetensors.torch import load_file
        sd = load_file(str(weights_path))
    else:
        bin_path = Path(adapter_dir) / "adapter_model.bin"
        if not bin_path.is_file():
            raise PeftFormatError(f"{adapter_dir} has neither {WEIGHTS_FILE} nor adapter_model.bin")
        sd = torch.load(bin_path, map_location="cpu", weights_only=True)
    # PEFT strips the adapter name on save; some writers keep ".default". Both are read.
    sd = {k.replace(".default.weight", ".weight"): v for k, v in sd.items()}
    names = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in sd if k.startswith(PEFT_PREFIX)})
    if not names:
        raise PeftFormatError(f"{weights_path}: no {PEFT_PREFIX}*.lora_A/B tensors")
    r = int(cfg["r"])
    alpha = float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):  # scaling alpha / sqrt(r) == dodo's alpha' / r with alpha' = alpha sqrt(r)
        alpha *= math.sqrt(r)
    lora_cfg = LoRAConfig(r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)), targets=names)
    done = []
    for name in names:
        try:
            module = root.get_submodule(name)
        except AttributeError:
            raise PeftFormatError(f"{adapter_dir}: module {name} is not in {type(root).__name__}; "
                                  "the adapter belongs to another base model") from None
        if not is_linear(module):
            raise PeftFormatError(f"{adapter_dir}: {name} is a {type(module).__name__}, not a Linear/Conv1D")
        wrapped = LoRALinear(module, lora_cfg)
        with torch.no_grad():
            for part in ("lora_A", "lora_B"):
                src = sd[f"{PEFT_PREFIX}{name}.{part}.weight"]
                dst = getattr(wrapped, part).weight
                if src.shape != dst.shape:
                    raise PeftFormatError(f"{adapter_dir}: tensor {name}.{part}.weight has shape "
                                          f"{tuple(src.shape)}, the model expects {tuple(dst.shape)}")
                dst.copy_(src)
        wrapped.to(next(module.parameters()).device)
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, wrapped)
        done.append(name)
    return done


def merged_copy(root: nn.Module, plain_ok: bool = False) -> nn.Module:
    """root with every mergeable adapter folded into its base weights and the wrappers removed,
    ready for ``save_pretrained``. Adapters that cannot be merged are refused (one line).
    ``plain_ok``: a model without adapters (fully fine-tuned) is returned as it is."""
    import copy
    model = copy.deepcopy(root)
    adapters = _adapters(model)
    if not adapters and not plain_ok:
        raise PeftFormatError("the model has no adapters to merge")
    for name, m in adapters.items():
        if not hasattr(m, "merge") or not hasattr(m, "base"):
            raise PeftFormatError(f"{type(m).__name__} at {name} is not linear in the base weights and "
                                  "cannot be merged; export it with its own checkpoint instead")
        m.merge()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, m.base)
    return model


def export_merged(root: nn.Module, out_dir: str | os.PathLike, plain_ok: bool = False) -> Path:
    """A Hugging Face directory (save_pretrained) of the base model with the adapters folded in
    (``plain_ok``: or of a fully fine-tuned model without adapters)."""
    model = merged_copy(root, plain_ok)
    if not hasattr(model, "save_pretrained"):
        raise PeftFormatError(f"{type(root).__name__} is not a Hugging Face model; a merged export "
                              "writes a save_pretrained directory")
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, nn.Parameter) and scale.shape == (1,):
        # dodo's CLIP holds the temperature as shape (1,) for DeepSpeed; CLIPModel's is 0-dim.
        model.logit_scale = nn.Parameter(scale.detach().reshape(()))
    for p in model.parameters():
        p.requires_grad_(True)  # a plain model again, as from_pretrained would give it
    model.save_pretrained(str(out_dir))
    return Path(out_dir)
