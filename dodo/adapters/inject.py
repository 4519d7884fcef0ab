"""Insert adapters into a model by module-name patterns, and freeze everything else.

A model family describes its transformer blocks as ``Block`` records (tower, layer index,
the names of the attention / MLP sub-layers and of their output projections). ``inject``
selects blocks by ``adapter.towers`` and ``adapter.layers``, then sub-layers by
``adapter.locations``, keeps the module names that match every ``adapter.targets`` regular
expression, and wraps or extends those modules with the configured adapter kind:

  bottleneck  wraps the attention / MLP sub-layer (AdaptedSublayer)
  lora        wraps the Linear / Conv1D modules inside those sub-layers whose name ends with
              one of ``adapter.lora.targets`` (LoRALinear)
  r_adapter   wraps the output projection of the attention and / or of the MLP
  prefix      adds a ``dodo_prefix`` child (PrefixKV) to each attention module
  mam         prefix + a parallel bottleneck adapter on the MLP
  film        wraps the sub-layer with FiLMSublayer (needs the model's FiLMCondition)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from dodo.adapters.bottleneck import AdaptedSublayer
from dodo.adapters.config import AdapterConfig
from dodo.adapters.film import FiLMCondition, FiLMSublayer
from dodo.adapters.lora import LoRALinear, is_linear
from dodo.adapters.prefix import PrefixKV, enable_prefix
from dodo.adapters.r_adapter import RAdapterLinear


@dataclass
class Block:
    """One transformer block of a model, as the adapter code needs to see it.

    Sub-layer names are relative to the block; ``mlp`` / ``mlp_out`` may list several modules
    (VLMo's per-modality FFN experts).
    """

    name: str  # full module name of the block, e.g. "text_model.encoder.layers.3"
    tower: str  # lm | vision | text | fusion
    layer: int  # index within its tower
    d_model: int
    n_head: int
    attention: str
    attn_out: str
    mlp: list[str] = field(default_factory=list)
    mlp_out: list[str] = field(default_factory=list)


# GPT-2, GPT-Neo and GPT-J keep their blocks in `transformer.h` with `attn` and `mlp` children.
_LM_OUT = {"gpt2": ("attn.c_proj", "mlp.c_proj"), "gpt_neo": ("attn.attention.out_proj", "mlp.c_proj"),
           "gptj": ("attn.out_proj", "mlp.fc_out")}


def lm_blocks(lm: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a GPT-2 / GPT-Neo / GPT-J causal LM."""
    try:
        return lm.transformer.h
    except AttributeError as err:
        raise TypeError(f"{type(lm).__name__} has no transformer.h block list; "
                        "supported LM families: gpt2, gpt_neo, gptj") from err


def lm_block_specs(lm: nn.Module, prefix: str = "") -> list[Block]:
    config = lm.config
    attn_out, mlp_out = _LM_OUT.get(config.model_type, _LM_OUT["gpt2"])
    d, heads = config.hidden_size, config.num_attention_heads
    return [Block(f"{prefix}transformer.h.{i}", "lm", i, d, heads, "attn", attn_out, ["mlp"], [mlp_out])
            for i in range(len(lm_blocks(lm)))]


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _select(blocks: list[Block], cfg: AdapterConfig) -> list[Block]:
    sizes: dict[str, int] = {}
    for b in blocks:
        sizes[b.tower] = max(sizes.get(b.tower, 0), b.layer + 1)
    chosen = []
    for b in blocks:
        if cfg.towers and b.tower not in cfg.towers:
            continue
        if cfg.layers and not any(b.layer == (i if i >= 0 else sizes[b.tower] + i) for i in cfg.layers):
            continue
        chosen.append(b)
    return chosen


def _matches(name: str, cfg: AdapterConfig) -> bool:
    return all(re.search(p, name) for p in cfg.targets)


def inject(root: nn.Module, blocks: list[Block], cfg: AdapterConfig,
           condition: FiLMCondition | None = None) -> list[str]:
    """Add the configured adapters to ``root``; returns the names of the adapted modules."""
    if cfg.kind == "none":
        return []
    towers = sorted({b.tower for b in blocks})
    missing = [t for t in cfg.towers if t not in towers]
    if missing:
        raise ValueError(f"model.adapter.towers names {missing}, which this model does not have; "
                         f"its towers: {towers}")
    if cfg.kind == "mam" and cfg.placement == "sequential":
        raise ValueError("model.adapter.kind=mam pairs prefix tuning with a parallel adapter; "
                         "set model.adapter.placement to parallel or scaled_parallel")
    if cfg.kind == "film" and condition is None:
        raise ValueError("this model does not provide a FiLM condition; use another adapter kind")
    done: list[str] = []
    for b in _select(blocks, cfg):
        locations = list(dict.fromkeys(cfg.locations))
        if cfg.kind in ("prefix", "mam"):
            name = f"{b.name}.{b.attention}"
            if _matches(name, cfg):
                root.get_submodule(name).dodo_prefix = PrefixKV(b.d_model, b.n_head, cfg.prefix)
                done.append(name)
            locations = ["mlp"] if cfg.kind == "mam" else []
        for location in locations:
            subs = [b.attention] if location == "attention" else b.mlp
            outs = [b.attn_out] if location == "attention" else b.mlp_out
            if cfg.kind in ("bottleneck", "mam", "film"):
                for sub in subs:
                    name = f"{b.name}.{sub}"
                    if not _matches(name, cfg):
                        continue
                    base = root.get_submodule(name)
                    wrapped = (FiLMSublayer(base, b.d_model, condition) if cfg.kind == "film"
                               else AdaptedSublayer(base, b.d_model, cfg))
                    _set_module(root, name, wrapped)
                    done.append(name)
            elif cfg.kind == "r_adapter":
                for out in outs:
                    name = f"{b.name}.{out}"
                    if _matches(name, cfg):
                        _set_module(root, name, RAdapterLinear(root.get_submodule(name), cfg.r_adapter))
                        done.append(name)
            elif cfg.kind == "lora":
                for sub in subs:
                    for child, module in list(root.get_submodule(f"{b.name}.{sub}").named_modules()):
                        name = f"{b.name}.{sub}.{child}" if child else f"{b.name}.{sub}"
                        if (is_linear(module) and any(name.endswith(t) for t in cfg.lora.targets)
                                and _matches(name, cfg)):
                            _set_module(root, name, LoRALinear(module, cfg.lora))
                            done.append(name)
    if not done:
        raise ValueError(f"model.adapter (kind={cfg.kind}) matched no module: check towers={cfg.towers}, "
                         f"layers={cfg.layers}, locations={cfg.locations}, targets={cfg.targets}"
                         + (f", lora.targets={cfg.lora.targets}" if cfg.kind == "lora" else ""))
    if cfg.kind in ("prefix", "mam"):
        enable_prefix(root)
    return done


def inject_adapters(lm: nn.Module, cfg: AdapterConfig, d_model: int,
                    condition: FiLMCondition | None = None) -> list[str]:
    """Adapters in every selected block of a GPT-2 / GPT-Neo / GPT-J causal LM."""
    del d_model  # read from the LM's config
    return inject(lm, lm_block_specs(lm), cfg, condition)


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total
