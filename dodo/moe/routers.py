"""Routers: which expert(s) each token goes to, and with what gate weight.

Every router returns a `Routing`: a flat list of (token, expert, weight) assignments, in
priority order, plus its auxiliary loss and statistics. The layer's dispatch (dispatch.py)
only sees that list, so routers and the dispatch are swapped independently.

All routing math runs in fp32, whatever the dtype of the hidden states and router weights.

Conventions (N tokens, E experts, k choices per token):
- capacity = max(min_capacity, ceil(k * N / E * capacity_factor)), or None (dropless).
- Priority when an expert is over capacity (GShard / DeepSpeed `top2gating`): every token's
  1st choice before any 2nd choice, and within one choice level, earlier tokens first.
- Load-balancing loss (Switch / GShard): E * sum_i P_i f_i, P_i the mean router probability
  of expert i, f_i the fraction of tokens whose FIRST choice is i (as DeepSpeed's top1/top2).
- Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.

The learned top-k router takes its softmax, top-k and dispatch permutation from the
``dodo_kernels.route_topk`` op (one Triton kernel chain on CUDA, its PyTorch reference
elsewhere); `topk_gating` is the plain-PyTorch twin the tests compare with. Capacity, gate
normalisation and the losses are the same code on both paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dodo_kernels
from dodo.moe.config import MoEConfig


@dataclass
class Routing:
    token: Tensor  # (M,) long: the token of each kept assignment
    expert: Tensor  # (M,) long: its global expert id
    weight: Tensor  # (M,) fp32: its gate weight (differentiable for learned routers)
    aux_loss: Tensor  # scalar, already weighted: aux_loss * balance + z_loss * z
    num_slots: int  # assignments asked for (k * N for top-k); num_slots - M were dropped
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached, for logging
    # The same routing in the form of the fused expert op (dodo_kernels.moe_adapter_experts),
    # for routers that give every token exactly k assignments (None otherwise):
    gates: Optional[Tensor] = None  # (N, k) fp32: weight of assignment t*k+j, 0 where dropped
    order: Optional[Tensor] = None  # (N*k,) int32: assignments t*k+j grouped by expert
    offsets: Optional[Tensor] = None  # (E+1,) int32: expert e owns order[offsets[e]:offsets[e+1]]


def capacity_for(num_tokens: int, num_experts: int, k: int, factor: float, min_capacity: int) -> int:
    return max(min_capacity, math.ceil(k * num_tokens / num_experts * factor))


def balance_loss(probs: Tensor, first_choice: Tensor) -> Tensor:
    """E * sum_i P_i f_i; probs (N, E) fp32, first_choice (N,) long."""
    num_experts = probs.shape[1]
    f = F.one_hot(first_choice, num_experts).float().mean(0)
    return num_experts * (probs.mean(0) * f).sum()


def z_loss(logits: Tensor) -> Tensor:
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def entropy(probs: Tensor) -> Tensor:
    """Mean entropy (nats) of the per-token router distributions."""
    return -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1).mean()


def topk_gating(logits: Tensor, k: int, capacity: Optional[int], normalize: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k softmax gating with capacity dropping.

    logits (N, E) fp32 -> (token, expert, weight, kept): the kept assignments in priority order
    (choice-major, then token order) and ``kept`` (N, k) bool, which choices survived capacity.
    With ``normalize`` and k >= 2 each token's kept weights are divided by their sum (as
    DeepSpeed/GShard top-2); k = 1 keeps the raw probability (Switch), so the router learns.
    """
    probs = torch.softmax(logits, dim=-1)
    top_p, top_e = probs.topk(k, dim=-1)  # (N, k)
    return apply_capacity(top_p, top_e, logits.shape[1], capacity, normalize)[:4]


def apply_capacity(top_p: Tensor, top_e: Tensor, num_experts: int, capacity: Optional[int], normalize: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The capacity and normalisation step of `topk_gating`, from the (N, k) top-k probabilities
    and experts (long). Also returns ``gates`` (N, k): the final weights, 0 where dropped."""
    n, k = top_p.shape
    choice_major = top_e.t().reshape(-1)  # (k N,): all 1st choices, then all 2nd choices, ...
    onehot = F.one_hot(choice_major, num_experts)  # (k N, E)
    position = (onehot.cumsum(0) - 1).gather(1, choice_major[:, None]).squeeze(1)  # slot in its expert
    keep = position < capacity if capacity is not None else torch.ones_like(position, dtype=torch.bool)
    kept = keep.view(k, n).t()  # (N, k)
    weight = top_p * kept
    if normalize and k > 1:
        weight = weight / weight.sum(-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).eps)
    token = torch.arange(n, device=top_p.device).repeat(k)  # choice-major, like choice_major
    weight_cm = weight.t().reshape(-1)
    return token[keep], choice_major[keep], weight_cm[keep], kept, weight


def _stats(load: Tensor, probs: Optional[Tensor], bal: Tensor, z: Tensor) -> dict[str, Tensor]:
    zero = load.new_zeros(())
    return {"load": load.detach().float(), "entropy": entropy(probs).detach() if probs is not None else zero,
            "balance_loss": bal.detach(), "z_loss": z.detach()}


class TopKRouter(nn.Module):
    """Learned top-k softmax gate (Switch k=1, GShard k=2, any k), optional noise, capacity."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.wg = nn.Linear(d_model, cfg.num_experts, bias=False)  # DeepSpeed's name for the gate
        self.use_kernels = True  # False: the plain-PyTorch twin (topk_gating), for tests

    def logits(self, x: Tensor) -> Tensor:  # (N, d) -> (N, E), fp32
        cfg = self.cfg
        x = x.float()
        if self.training and cfg.noise == "jitter" and cfg.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1 - cfg.jitter_eps, 1 + cfg.jitter_eps)
        logits = F.linear(x, self.wg.weight.float())
        if self.training and cfg.noise == "gaussian" and cfg.noise_std > 0:
            logits = logits + torch.randn_like(logits) * (cfg.noise_std / cfg.num_experts)
        return logits

    def capacity(self, num_tokens: int) -> Optional[int]:
        cfg = self.cfg
        if cfg.dropless:
            return None
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        return capacity_for(num_tokens, cfg.num_experts, cfg.top_k, factor, cfg.min_capacity)

    def forward(self, x: Tensor, keys: "RoutingKeys | None" = None) -> Routing:
        cfg = self.cfg
        logits = self.logits(x)
        capacity = self.capacity(x.shape[0])
        if not self.use_kernels:
            token, expert, weight, kept = topk_gating(logits, cfg.top_k, capacity, cfg.normalize_gates)
            probs = torch.softmax(logits, dim=-1)
            bal, z = balance_loss(probs, probs.argmax(-1)), z_loss(logits)
            load = torch.bincount(expert, minlength=cfg.num_experts)
            return Routing(token, expert, weight, cfg.aux_loss * bal + cfg.z_loss * z, kept.numel(),
                           _stats(load, probs, bal, z))
        # Softmax, top-k (ties to the lower expert), counts and the expert-sorted permutation in
        # one op; raw top-k probabilities (normalize=False): normalisation comes after dropping.
        r = dodo_kernels.route_topk(logits, cfg.top_k, normalize=False)
        top_e = r.ids.long()
        token, expert, weight, kept, gates = apply_capacity(r.weights, top_e, cfg.num_experts, capacity,
                                                            cfg.normalize_gates)
        bal, z = balance_loss(r.probs, top_e[:, 0]), z_loss(logits)
        load = torch.bincount(expert, minlength=cfg.num_experts)
        return Routing(token, expert, weight, cfg.aux_loss * bal + cfg.z_loss * z, kept.numel(),
                       _stats(load, r.probs, bal, z), gates, r.order, r.offsets)


class ExpertChoiceRouter(TopKRouter):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens by router
    probability, C = ceil(k * N / E * capacity_factor) with k = top_k (the average number of
    experts per token). Balanced by construction (no balance loss); a token may get no expert.
    It looks at all tokens of the batch at once, future positions included."""

    def forward(self, x: Tensor, keys: "RoutingKeys | None" = None) -> Routing:
        cfg = self.cfg
        n = x.shape[0]
        logits = self.logits(x)
        probs = torch.softmax(logits, dim=-1)  # (N, E)
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        c = min(n, capacity_for(n, cfg.num_experts, cfg.top_k, factor, cfg.min_capacity))
        weight, token = probs.t().topk(c, dim=-1)  # (E, C)
        expert = torch.arange(cfg.num_experts, device=x.device).repeat_interleave(c)
        z = z_loss(logits)
        load = torch.full((cfg.num_experts,), c, device=x.device)
        routed = torch.zeros(n, dtype=torch.bool, device=x.device)
        routed[token.reshape(-1)] = True
        stats = _stats(load, probs, z.new_zeros(()), z)
        # A token counts as dropped when no expert picked it: report slots = tokens.
        return Routing(token.reshape(-1), expert, weight.reshape(-1), cfg.z_loss * z, n,
                       {**stats, "unrouted": (~routed).sum().detach().float()})


@dataclass
class RoutingKeys:
    """What parameter-free routers need per token, flattened like the hidden states (N,):
    ``token_id`` (text tokens; -1 on image positions), ``position`` (column in the sequence)."""

    token_id: Tensor
    position: Tensor

    @property
    def is_image(self) -> Tensor:
        return self.token_id < 0


def hash_table(size: int, num_experts: int, kind: str, seed: int) -> Tensor:
    """A fixed key -> expert table. balanced: each expert gets floor or ceil(size / E) keys
    (a seeded permutation dealt round robin); random: an independent uniform expert per key."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "balanced":
        return torch.randperm(size, generator=gen) % num_experts
    return torch.randint(num_experts, (size,), generator=gen)


class HashRouter(nn.Module):
    """Hash layers (Roller et al. 2021): text tokens by a fixed token-id -> expert table, image
    prefix tokens by their position. No parameters, no balance loss; gate weight 1."""

    def __init__(self, cfg: MoEConfig, vocab_size: int, max_positions: int, layer_seed: int = 0):
        super().__init__()
        self.cfg = cfg
        seed = cfg.hash_seed * 1_000_003 + layer_seed
        # Non-persistent: rebuilt from the seed, never part of checkpoints.
        self.register_buffer("text_table", hash_table(vocab_size, cfg.num_experts, cfg.hash_table, seed),
                             persistent=False)
        self.register_buffer("image_table", hash_table(max_positions, cfg.num_experts, cfg.hash_table, seed + 1),
                             persistent=False)

    def forward(self, x: Tensor, keys: Optional[RoutingKeys]) -> Routing:
        if keys is None:
            raise RuntimeError("hash routing needs the token ids: call the model's forward/embed, "
                               "which sets them, not the LM directly")
        if keys.token_id.numel() and int(keys.token_id.max()) >= len(self.text_table):
            raise ValueError(f"token id {int(keys.token_id.max())} is outside the hash table of "
                             f"{len(self.text_table)} ids")
        expert = torch.where(keys.is_image, self.image_table[keys.position % len(self.image_table)],
                             self.text_table[keys.token_id.clamp_min(0)])
        return _fixed_routing(expert, self.cfg.num_experts)


class ModalityRouter(nn.Module):
    """VLMo-style routing by modality: image tokens -> expert 0, text tokens -> expert 1; from
    LM block ``vl_from_layer`` on, every token -> expert 2 (the vision-language expert)."""

    def __init__(self, cfg: MoEConfig, layer_index: int):
        super().__init__()
        self.cfg = cfg
        self.all_to_vl = 0 <= cfg.vl_from_layer <= layer_index

    def forward(self, x: Tensor, keys: Optional[RoutingKeys]) -> Routing:
        if keys is None:
            raise RuntimeError("modality routing needs to know which tokens are image tokens: call "
                               "the model's forward/embed, which sets it, not the LM directly")
        if self.all_to_vl:
            expert = torch.full_like(keys.token_id, 2)
        else:
            expert = torch.where(keys.is_image, 0, 1)
        return _fixed_routing(expert, self.cfg.num_experts)


def _fixed_routing(expert: Tensor, num_experts: int) -> Routing:
    n = expert.shape[0]
    token = torch.arange(n, device=expert.device)
    weight = torch.ones(n, device=expert.device)
    load = torch.bincount(expert, minlength=num_experts)
    zero = weight.new_zeros(())
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=expert.device)
    offsets[1:] = torch.cumsum(load, 0)
    order = torch.argsort(expert, stable=True).to(torch.int32)
    return Routing(token, expert, weight, zero, n, _stats(load, None, zero, zero),
                   weight[:, None], order, offsets)


def build_router(cfg: MoEConfig, d_model: int, layer_index: int, vocab_size: int, max_positions: int
                 ) -> nn.Module:
    if cfg.router == "topk":
        return TopKRouter(d_model, cfg)
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(d_model, cfg)
    if cfg.router == "hash":
        return HashRouter(cfg, vocab_size, max_positions, layer_seed=layer_index)
    return ModalityRouter(cfg, layer_index)
