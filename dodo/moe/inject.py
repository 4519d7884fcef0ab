"""Turn the dense bottleneck adapters of chosen LM blocks into MoE adapters.

The dense injection (dodo.adapters.inject) runs first and decides placement (sequential /
parallel / scaled_parallel) and locations (attention and / or MLP); here the ``adapter`` of
each `AdaptedSublayer` in the blocks of ``model.moe.layers`` is replaced by an `MoEAdapter`
of E experts. Everything else (other blocks, placement scales, the prefix projection) stays
as it is, which is what makes sparse upcycling a plain copy.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dodo.adapters.bottleneck import AdaptedSublayer, BottleneckAdapter
from dodo.adapters.config import AdapterConfig
from dodo.adapters.inject import lm_blocks
from dodo.moe.config import MoEConfig
from dodo.moe.layer import MoEAdapter, RoutingContext, moe_layers
from dodo.moe.routers import build_router


class LoRAExpert(nn.Module):
    """A LoRA-style expert at the adapter position: (alpha / r) B A dropout(h); A Kaiming-uniform,
    B zero (PEFT's init), so each expert starts as the zero map. Uses ``model.adapter.lora``."""

    def __init__(self, d_model: int, cfg: AdapterConfig):
        super().__init__()
        r = cfg.lora.r
        self.scaling = cfg.lora.alpha / r
        self.dropout = nn.Dropout(cfg.lora.dropout)
        self.lora_A = nn.Linear(d_model, r, bias=False)
        self.lora_B = nn.Linear(r, d_model, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, h: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(self.dropout(h))) * self.scaling


def build_expert(d_model: int, moe: MoEConfig, adapter: AdapterConfig) -> nn.Module:
    return BottleneckAdapter(d_model, adapter) if moe.expert == "bottleneck" else LoRAExpert(d_model, adapter)


class MoEAdapters:
    """The MoE side of one model: its layers, the shared routing context, aux losses, metrics.
    A plain object (not a module), so the layers are registered only once, inside the LM."""

    def __init__(self, layers: list[MoEAdapter], context: RoutingContext):
        self.layers = layers
        self.context = context

    def set_tokens(self, input_ids: Tensor, n_prefix: int) -> None:
        """Token ids of the whole LM input: -1 on the n_prefix image positions, then the text."""
        image = input_ids.new_full((input_ids.shape[0], n_prefix), -1)
        self.context.set(torch.cat([image, input_ids], dim=1))

    def aux_loss(self) -> Tensor:
        """Sum of the layers' weighted router losses of the last forward (then forgotten)."""
        losses = [layer.last_aux_loss for layer in self.layers if layer.last_aux_loss is not None]
        for layer in self.layers:
            layer.last_aux_loss = None
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def step_metrics(self) -> dict[str, object]:
        """Routing statistics since the last call, summed over layers and (collective) all ranks."""
        num_experts = self.layers[0].num_experts
        names = ("dropped", "slots", "entropy", "balance_loss", "z_loss", "calls")
        per_layer = torch.zeros(len(self.layers), num_experts + len(names), dtype=torch.float64)
        for i, layer in enumerate(self.layers):
            if layer.stats:
                per_layer[i, :num_experts] = layer.stats["load"].double()
                per_layer[i, num_experts:] = torch.stack([layer.stats[n].double() for n in names])
            layer.reset_stats()
        if dist.is_initialized():
            dist.all_reduce(per_layer)
        load, rest = per_layer[:, :num_experts], per_layer[:, num_experts:]
        calls = rest[:, 5].clamp_min(1)
        total_load = load.sum(0)
        fractions = total_load / total_load.sum().clamp_min(1)
        layer_fracs = load / load.sum(1, keepdim=True).clamp_min(1)
        return {
            "moe.load": [round(float(f), 4) for f in fractions],  # share of kept assignments per expert
            "moe.imbalance": float((layer_fracs.max(1).values * num_experts).max()),  # 1 = balanced
            "moe.dropped": float(rest[:, 0].sum() / rest[:, 1].sum().clamp_min(1)),
            "moe.entropy": float((rest[:, 2] / calls).mean()),
            "moe.balance_loss": float((rest[:, 3] / calls).mean()),
            "moe.z_loss": float((rest[:, 4] / calls).mean()),
        }


def chosen_layers(moe: MoEConfig, n_layer: int) -> list[int]:
    if not moe.layers:
        return list(range(n_layer))
    chosen = []
    for i in moe.layers:
        j = i if i >= 0 else n_layer + i
        if not 0 <= j < n_layer:
            raise ValueError(f"model.moe.layers has {i}, but the LM has {n_layer} blocks; "
                             f"use indices in [-{n_layer}, {n_layer - 1}]")
        chosen.append(j)
    return sorted(set(chosen))


def attach_moe(lm: nn.Module, moe: MoEConfig, adapter: AdapterConfig, d_model: int,
               vocab_size: int) -> Optional[MoEAdapters]:
    """Replace the dense bottleneck adapters of the chosen blocks; None when MoE is off."""
    if not moe.enabled:
        return None
    if adapter.kind != "bottleneck":
        raise ValueError(f"model.moe turns the bottleneck adapters of chosen blocks into mixtures; "
                         f"model.adapter.kind={adapter.kind} places none. Set model.adapter.kind=bottleneck "
                         f"(placement and locations come from it; model.moe.expert picks the expert type)")
    blocks = lm_blocks(lm)
    max_positions = int(getattr(lm.config, "n_positions", 0) or getattr(lm.config, "max_position_embeddings", 2048))
    context = RoutingContext()
    layers = []
    for i in chosen_layers(moe, len(blocks)):
        subs = [m for m in blocks[i].children() if isinstance(m, AdaptedSublayer)]
        if not subs:
            raise ValueError(f"model.moe.layers includes LM block {i}, which has no bottleneck adapter; "
                             f"model.adapter.layers={adapter.layers} leaves it out")
        for sub in subs:
            experts = [build_expert(d_model, moe, adapter) for _ in range(moe.num_experts)]
            router = build_router(moe, d_model, i, vocab_size, max_positions)
            sub.adapter = MoEAdapter(experts, router, moe, context, layer_index=i)
            layers.append(sub.adapter)
    return MoEAdapters(layers, context)


# ---------------------------------------------------------------- sparse upcycling


EXPERT_INFIX = ".deepspeed_moe.experts.deepspeed_experts."
ROUTER_INFIX = ".deepspeed_moe.gate."


@torch.no_grad()
def upcycle(model: nn.Module, dense_state: dict[str, Tensor], noise: float = 0.0, seed: int = 0) -> list[str]:
    """Sparse upcycling (Komatsuzaki et al.): every expert of every MoE layer becomes a copy of
    the dense adapter that sat there (plus ``noise`` * std(weight) * N(0, 1), seeded per layer
    and expert), routers keep their fresh init, every other trainable tensor is copied.

    Runs on the freshly built model, before DeepSpeed splits the experts over ranks, so all E
    experts get their copy whatever moe.ep_size is. Returns the names that were not copied
    (the routers). ``dense_state``: the dense run's trainable state dict (its checkpoint)."""
    own = dict(model.named_parameters())
    used, fresh = set(), []
    for name, p in own.items():
        if not p.requires_grad:
            continue
        if ROUTER_INFIX in name:
            fresh.append(name)
            continue
        if EXPERT_INFIX in name:
            continue  # below, for all E experts
        _copy(p, dense_state, name, used)
    for layer_no, (prefix, layer) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, MoEAdapter)):
        experts = layer._all_experts_at_init or list(layer.local_experts)
        for e, expert in enumerate(experts):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + layer_no * 1009 + e)
            for sub, p in expert.named_parameters():
                src = _copy(p, dense_state, f"{prefix}.{sub}", used)
                if noise > 0 and src.numel() > 1:
                    p.add_(torch.randn(p.shape, generator=gen).to(p) * noise * float(src.float().std()))
    unused = sorted(set(dense_state) - used)
    if unused:
        raise ValueError(f"the dense checkpoint has tensors the MoE model has no place for: {unused[:5]}; "
                         "upcycle from a run with the same model and adapter config")
    return fresh


def _copy(p: Tensor, state: dict[str, Tensor], name: str, used: set) -> Tensor:
    if name not in state:
        raise ValueError(f"the dense checkpoint has no {name!r}; upcycle from a run with the same "
                         "model and adapter config (model.moe off)")
    src = state[name]
    if src.shape != p.shape:
        raise ValueError(f"{name}: dense checkpoint shape {tuple(src.shape)} != model shape {tuple(p.shape)}; "
                         "upcycle from a run with the same model and adapter config")
    p.copy_(src.to(p.dtype))
    used.add(name)
    return src


def has_moe(model: nn.Module) -> bool:
    return bool(moe_layers(model))
