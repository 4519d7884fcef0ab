"""The MoE adapter layer: a router and E experts in place of one dense adapter.

    A_moe(h) = sum_{e in route(h)} g_e(h) * A_e(h)       (per token; h (B, T, d) -> (B, T, d))

It sits where a dense adapter sits (inside `AdaptedSublayer`, after attention and/or the MLP,
in any placement), so with E identical experts and gates summing to 1 it equals the dense
adapter: that is what sparse upcycling starts from.

DeepSpeed integration: the layer IS a `deepspeed.moe.layer.MoE` (the class its engine looks
for) with the attribute and parameter names DeepSpeed's MoE uses: local experts at
``deepspeed_moe.experts.deepspeed_experts.<i>`` with ``allreduce=False`` and
``group_name="ep_size_<ep>"`` on their parameters, the gate at ``deepspeed_moe.gate.wg``. So
the engine creates the expert-parallel / expert-data-parallel groups, ZeRO-1/2 reduce expert
gradients over the expert-data-parallel group, and checkpoints store one file per global
expert (``layer_<l>_expert_<e>_mp_rank_00_model_states.pt``). dodo's own router and dispatch
run the forward (DeepSpeed's own gate supports k <= 2 and no hash / expert-choice routing).

Hot path: bottleneck experts run through ``dodo_kernels.moe_adapter_experts`` (Triton on
CUDA, its PyTorch reference elsewhere) on the experts' parameters stacked per forward, so
the parameters, their names and DeepSpeed tags stay those of the per-expert modules. Without
expert parallelism the op does the gather, the grouped experts and the gate-weighted combine
from the router's ``gates``/``order``/``offsets``; with ep > 1 it computes the rows received
by the all-to-all. LoRA experts, layer norm, tanh / tanh-GELU, dropout in training and
expert-choice routing keep the plain dispatch (dispatch.py), which is also the twin the tests
compare with (``use_kernels(False)``).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import Tensor, nn

import dodo_kernels
from dodo.adapters.bottleneck import BottleneckAdapter
from dodo.moe.config import MoEConfig
from dodo.moe.dispatch import FusedExperts, moe_dispatch
from dodo.moe.routers import Routing, RoutingKeys


class RoutingContext:
    """Per-forward token information shared by the MoE layers of one model (set by the model's
    embed step): text token ids (-1 on image positions), (B, S)."""

    def __init__(self) -> None:
        self.token_ids: Optional[Tensor] = None

    def set(self, token_ids: Tensor) -> None:
        self.token_ids = token_ids

    def keys_for(self, shape: torch.Size) -> Optional[RoutingKeys]:
        ids = self.token_ids
        if ids is None or tuple(ids.shape) != tuple(shape[:-1]):
            return None
        position = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return RoutingKeys(ids.reshape(-1), position.reshape(-1))


_OP_ACTIVATIONS = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu"}


def stacked_experts(experts: list[nn.Module]) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor, str]]:
    """(W_down (E,H,D), b_down (E,H), W_up (E,D,H), b_up (E,D), activation) of bottleneck
    experts for dodo_kernels.moe_adapter_experts, or None where the op does not compute what
    the modules do: LoRA experts, layer norm, tanh or tanh-approximate GELU, dropout > 0 in
    training. torch.stack is differentiable: gradients reach each expert's own parameters."""
    if not experts:
        return None
    names = set()
    for e in experts:
        if (not isinstance(e, BottleneckAdapter) or not isinstance(e.norm, nn.Identity)
                or getattr(e.act, "approximate", "none") != "none" or (e.training and e.dropout.p > 0)):
            return None
        names.add(_OP_ACTIVATIONS.get(type(e.act)))
    if len(names) != 1 or None in names:
        return None
    return (torch.stack([e.down.weight for e in experts]), torch.stack([e.down.bias for e in experts]),
            torch.stack([e.up.weight for e in experts]), torch.stack([e.up.bias for e in experts]),
            names.pop())


class _Experts(nn.Module):
    """DeepSpeed's layout: ``deepspeed_experts`` holds this rank's experts."""

    def __init__(self, experts: list[nn.Module], group_name: str):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(experts)
        for p in self.deepspeed_experts.parameters():
            p.allreduce = False  # DeepSpeed: an expert parameter, reduced over its expert-data group
            p.group_name = group_name


class _Inner(nn.Module):
    """DeepSpeed's ``deepspeed_moe`` slot: the gate, the local experts, the expert-parallel group."""

    def __init__(self, gate: nn.Module, experts: _Experts):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.ep_group: Optional[dist.ProcessGroup] = None

    def _set_ep_group(self, group) -> None:  # called by DeepSpeed's set_deepspeed_parallelism
        self.ep_group = group


class MoEAdapter(DeepSpeedMoE):
    def __init__(self, all_experts: list[nn.Module], router: nn.Module, cfg: MoEConfig,
                 context: RoutingContext, layer_index: int):
        nn.Module.__init__(self)  # not DeepSpeedMoE.__init__: it would build its own gate and experts
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.ep_size = cfg.ep_size
        self.num_local_experts = cfg.num_experts // cfg.ep_size
        self.expert_group_name = f"ep_size_{cfg.ep_size}"
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.layer_index = layer_index
        self.context = context
        # Every rank builds all E experts from the same RNG stream and keeps its own share, so
        # the initial weights do not depend on ep_size. Until the expert-parallel group is set
        # (set_deepspeed_parallelism), a rank holds experts [0, L).
        self._all_experts_at_init = all_experts
        self.deepspeed_moe = _Inner(router, _Experts(all_experts[:self.num_local_experts], self.expert_group_name))
        self.last_aux_loss: Optional[Tensor] = None
        self._replicas: Optional[list[nn.Module]] = None  # all E experts, while replicated
        self._use_kernels = True
        self.reset_stats()

    def use_kernels(self, on: bool = True) -> "MoEAdapter":
        """False: the plain-PyTorch router and dispatch (the twin the tests compare with)."""
        self._use_kernels = on
        if hasattr(self.deepspeed_moe.gate, "use_kernels"):
            self.deepspeed_moe.gate.use_kernels = on
        return self

    # ---------------------------------------------------------------- parallelism

    @property
    def ep_group(self) -> Optional[dist.ProcessGroup]:
        return self.deepspeed_moe.ep_group if self.ep_size > 1 else None

    @property
    def ep_rank(self) -> int:
        group = self.ep_group
        return dist.get_rank(group) if group is not None else 0

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def global_expert_ids(self) -> range:
        lo = self.ep_rank * self.num_local_experts
        return range(lo, lo + self.num_local_experts)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        self._take_local_share()

    def _take_local_share(self) -> None:
        """Keep this rank's experts [r L, (r+1) L) of the E built at init (before any training)."""
        if self._all_experts_at_init is None:
            return
        ids = self.global_expert_ids()
        with torch.no_grad():
            for local, e in zip(self.local_experts, ids):
                for p, q in zip(local.parameters(), self._all_experts_at_init[e].parameters()):
                    p.copy_(q.to(p.device, p.dtype))
        self._all_experts_at_init = None

    # ---------------------------------------------------------------- forward

    def forward(self, h: Tensor) -> Tensor:  # type: ignore[override]  # (..., d) -> (..., d)
        return self._moe(h, None)

    def fused_add(self, residual: Optional[Tensor], h: Tensor, scale=None) -> Optional[Tensor]:
        """residual + A_moe(h) for AdaptedSublayer's sequential placement, with the residual
        added inside the expert kernel where the Triton path runs (CUDA). None otherwise (CPU,
        a scale, the plain path): the wrapper then computes y + A_moe(h) itself, so results
        off the GPU are the same expression as before."""
        if (scale is not None or residual is None or not self._use_kernels
                or not dodo_kernels.use_triton(h, True, "moe adapter")):
            return None
        return self._moe(h, residual)

    def _moe(self, h: Tensor, residual: Optional[Tensor]) -> Tensor:
        x = h.reshape(-1, h.shape[-1])  # (N, d)
        routing: Routing = self.deepspeed_moe.gate(x, self.context.keys_for(h.shape))
        if self._replicas is not None:
            experts, group = self._replicas, None
        else:
            experts, group = list(self.local_experts), self.ep_group
        stacked = stacked_experts(experts) if self._use_kernels else None
        res = None if residual is None else residual.reshape(x.shape)
        if stacked is not None and group is None and routing.gates is not None:
            # Gather, grouped experts and gate-weighted combine in one op; dropped assignments
            # have gate 0 (computed, contribute nothing).
            w_down, b_down, w_up, b_up, act = stacked
            y = dodo_kernels.moe_adapter_experts(x, routing.gates, routing.order, routing.offsets,
                                                 w_down, b_down, w_up, b_up, res, act)
            res = None
        else:
            fused = _fused_rows(stacked) if stacked is not None else None
            y = moe_dispatch(x, routing.token, routing.expert, routing.weight, experts, self.num_experts,
                             group, fused)
        if res is not None:
            y = res + y
        self.last_aux_loss = routing.aux_loss
        if self.training:
            self._record(routing)
        return y.view(h.shape)

    # ---------------------------------------------------------------- statistics

    def reset_stats(self) -> None:
        self.stats: dict[str, Tensor] = {}

    @torch.no_grad()
    def _record(self, r: Routing) -> None:
        kept = r.token.numel()
        dropped = r.stats.get("unrouted", torch.tensor(float(r.num_slots - kept)))
        row = {"load": r.stats["load"].cpu(), "dropped": dropped.float().cpu(),
               "slots": torch.tensor(float(r.num_slots)), "entropy": r.stats["entropy"].float().cpu(),
               "balance_loss": r.stats["balance_loss"].float().cpu(), "z_loss": r.stats["z_loss"].float().cpu(),
               "calls": torch.tensor(1.0)}
        for key, value in row.items():
            self.stats[key] = self.stats[key] + value if key in self.stats else value

    # ---------------------------------------------------------------- replication

    @torch.no_grad()
    def replicate(self) -> None:
        """Collective over the expert-parallel group: every rank gets a copy of all E experts,
        so this layer runs without all-to-all (for work that only some ranks do, e.g. rank 0's
        greedy captions). Undo with `drop_replicas`."""
        local = list(self.local_experts)
        group = self.ep_group
        if group is None:
            self._replicas = local
            return
        flat = torch.cat([p.detach().reshape(-1) for e in local for p in e.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(self.ep_size)]
        dist.all_gather(gathered, flat, group=group)
        replicas = []
        for source in gathered:
            offset = 0
            for e in local:
                twin = copy.deepcopy(e)
                for p in twin.parameters():
                    p.requires_grad_(False)
                    p.copy_(source[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
                replicas.append(twin)
        self._replicas = replicas

    def drop_replicas(self) -> None:
        self._replicas = None


def _fused_rows(stacked: tuple[Tensor, Tensor, Tensor, Tensor, str]) -> FusedExperts:
    """The dispatch's grouped-experts step as the fused op: each received row is its own token
    with gate 1 (the gates are applied by the combine on the rows' home rank)."""
    w_down, b_down, w_up, b_up, act = stacked

    def run(rows: Tensor, order: Tensor, offsets: Tensor) -> Tensor:
        ones = torch.ones((rows.shape[0], 1), dtype=torch.float32, device=rows.device)
        return dodo_kernels.moe_adapter_experts(rows, ones, order, offsets, w_down, b_down, w_up, b_up,
                                                None, act)
    return run


def moe_layers(model: nn.Module) -> list[MoEAdapter]:
    return [m for m in model.modules() if isinstance(m, MoEAdapter)]


@contextlib.contextmanager
def replicated_experts(model: nn.Module) -> Iterator[None]:
    """Every rank enters together; inside, each MoE layer holds all experts and needs no other
    rank. A no-op for models without MoE layers."""
    layers = moe_layers(model)
    for layer in layers:
        layer.replicate()
    try:
        yield
    finally:
        for layer in layers:
            layer.drop_replicas()
