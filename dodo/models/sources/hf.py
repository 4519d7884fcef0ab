"""Hugging Face model directories (save_pretrained's layout; sharded or not, safetensors or bin).

towers:  lm -> AutoModelForCausalLM (GPT-2, GPT-Neo, GPT-J)      encoder -> AutoModel (BERT)
         vision / text -> CLIPVisionModel / CLIPTextModel       full -> AutoModel (CLIPModel)

Memory: ``from_pretrained(dtype=..., low_cpu_mem_usage=True)`` builds on the meta device and
loads each shard straight into the target dtype (no fp32 copy of the model per rank).
Shapes: checked before loading, from the checkpoint's headers (safetensors) or a memory-mapped
read (bin), against a meta-device build of the config, so a mismatch names its first tensor in
one line instead of transformers' multi-line report; missing tensors are an error too (a frozen
tower must not keep random weights silently).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from dodo.config.errors import ConfigError
from dodo.models.sources.config import SourceConfig, check_tokenizer_vocab  # noqa: F401 - re-exported
from dodo.models.sources.load import freeze_eval, pick_dtype


def _auto_class(tower: str) -> Any:
    import transformers as tf
    return {"lm": tf.AutoModelForCausalLM, "encoder": tf.AutoModel, "full": tf.AutoModel,
            "vision": tf.CLIPVisionModel, "text": tf.CLIPTextModel}[tower]


def checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every weight file of a model directory, without loading tensors."""
    files: list[str] = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, n))][:1]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        full = os.path.join(path, name)
        if name.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(full, "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            sd = torch.load(full, map_location="cpu", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in sd.items()})
    return shapes


def _check_shapes(model: nn.Module, path: str, key: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "")
    for name, shape in checkpoint_shapes(path).items():
        for cand in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if cand in expected:
                if expected[cand] != shape:
                    raise ConfigError(f"{key}.path={path!r}: tensor {name} has shape {shape}, but the "
                                      f"config.json architecture ({type(model).__name__}) expects "
                                      f"{expected[cand]}; the weights and config.json disagree")
                break


def load_hf(cfg: SourceConfig, key: str = "source", device: torch.device | None = None) -> nn.Module:
    """The configured tower of a local model directory, frozen, in eval mode and the chosen dtype."""
    import transformers as tf
    cls = _auto_class(cfg.tower)
    dtype = pick_dtype(cfg.dtype, device)
    try:
        config = tf.AutoConfig.from_pretrained(cfg.path, local_files_only=True, **cfg.kwargs())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}.path={cfg.path!r}: config.json unreadable: {str(err).splitlines()[0]}") from None
    if cfg.tower in ("vision", "text") and config.model_type == "clip":
        config = config.vision_config if cfg.tower == "vision" else config.text_config
    with torch.device("meta"):
        skeleton = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    _check_shapes(skeleton, cfg.path, key)
    del skeleton
    model, info = cls.from_pretrained(cfg.path, config=config, dtype=dtype, local_files_only=True,
                                      low_cpu_mem_usage=True, output_loading_info=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in info.get("missing_keys", []) if k not in tied]
    if missing:
        raise ConfigError(f"{key}.path={cfg.path!r} lacks tensor {missing[0]} ({len(missing)} missing); "
                          "a frozen tower would keep random weights: check the directory")
    return freeze_eval(model)


def load_hf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


