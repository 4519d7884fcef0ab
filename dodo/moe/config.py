"""Mixture-of-experts adapter config: ``model.moe``.

MoE is off while ``num_experts`` is 0. When on, the bottleneck adapters (``model.adapter``:
placement, locations, sizes) of the chosen LM ``layers`` become mixtures of ``num_experts``
experts of type ``expert``, combined with a router's gate weights. Cross-section checks
(ep_size against the world size, ZeRO-3) live in JobConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dodo.config.errors import check
from dodo.config.preflight import MUST_EXIST


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0: dense adapters, no MoE
    # topk: learned softmax gate (Switch k=1, GShard k=2, any k); hash: fixed token-id table
    # (Roller et al.); expert_choice: each expert takes its top-C tokens (Zhou et al.);
    # modality: image tokens -> expert 0, text -> expert 1 (VLMo; expert 2 = vision-language).
    router: Literal["topk", "hash", "expert_choice", "modality"] = "topk"
    expert: Literal["bottleneck", "lora"] = "bottleneck"  # lora: (alpha/r) B A h, B init 0
    layers: list[int] = field(default_factory=list)  # LM blocks with MoE adapters; [] = every block
    top_k: int = 2  # topk: experts per token; expert_choice: average experts per token
    capacity_factor: float = 1.25  # per-expert buffer = ceil(k * tokens / E * factor), training
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    dropless: bool = False  # capacity = the largest expert load: no token is ever dropped
    normalize_gates: bool = True  # k >= 2: the kept top-k weights of a token sum to 1
    aux_loss: float = 0.01  # weight of the load-balancing loss E * sum_i P_i f_i
    z_loss: float = 0.001  # weight of the router z-loss mean(logsumexp(logits)^2)
    noise: Literal["none", "gaussian", "jitter"] = "none"  # router noise, training only
    noise_std: float = 1.0  # gaussian: logits += noise_std * N(0, 1) / num_experts
    jitter_eps: float = 0.01  # jitter: router input *= U(1 - eps, 1 + eps)
    hash_table: Literal["balanced", "random"] = "balanced"
    hash_seed: int = 0
    vl_from_layer: int = -1  # modality: from this LM block on, every token -> expert 2; -1: never
    # Expert-parallel group size: experts split over this many ranks (1: every rank holds all
    # experts, their gradients all-reduced). "auto": dodo.moe.planner picks it from the model and
    # the cluster profile's bandwidths when the job config is resolved (docs/scaling.md).
    ep_size: int | Literal["auto"] = 1
    # Sparse upcycling: start every expert as a copy of a trained dense adapter. A file written
    # by `dodo upcycle`, a dense run directory (its latest checkpoint), or a folder of runs
    # (the newest one with a checkpoint, e.g. runs/demo). Empty: experts start fresh.
    upcycle_from: str = field(default="", metadata=MUST_EXIST)
    upcycle_noise: float = 0.0  # expert = dense + noise * std(dense weight) * N(0, 1)

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def __post_init__(self) -> None:
        check(self.num_experts >= 0, "num_experts", f"must be >= 0 (0 turns MoE off), got {self.num_experts}")
        check(self.ep_size == "auto" or self.ep_size >= 1, "ep_size", f"must be >= 1 or auto, got {self.ep_size}")
        check(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        check(self.capacity_factor > 0, "capacity_factor", f"must be > 0, got {self.capacity_factor}")
        check(self.eval_capacity_factor > 0, "eval_capacity_factor", f"must be > 0, got {self.eval_capacity_factor}")
        check(self.min_capacity >= 0, "min_capacity", f"must be >= 0, got {self.min_capacity}")
        check(self.aux_loss >= 0, "aux_loss", f"must be >= 0, got {self.aux_loss}")
        check(self.z_loss >= 0, "z_loss", f"must be >= 0, got {self.z_loss}")
        check(self.noise_std >= 0, "noise_std", f"must be >= 0, got {self.noise_std}")
        check(0 <= self.jitter_eps < 1, "jitter_eps", f"must be in [0, 1), got {self.jitter_eps}")
        check(self.upcycle_noise >= 0, "upcycle_noise", f"must be >= 0, got {self.upcycle_noise}")
        if not self.enabled or self.ep_size == "auto":
            return  # auto: resolved by JobConfig (it needs the world size), dodo.moe.planner
        check(self.num_experts % self.ep_size == 0, "ep_size",
              f"must divide model.moe.num_experts={self.num_experts}, got {self.ep_size}: each rank "
              f"of the expert-parallel group holds num_experts / ep_size experts; set model.moe.ep_size to "
              f"one of {_divisors(self.num_experts)}")
        check(not self.upcycle_from or self.expert == "bottleneck", "upcycle_from",
              f"upcycling copies a dense bottleneck adapter into every expert; model.moe.expert={self.expert} "
              "experts cannot be upcycled: set model.moe.expert=bottleneck or model.moe.upcycle_from=''")
        if self.router == "topk":
            check(self.top_k <= self.num_experts, "top_k",
                  f"must be <= model.moe.num_experts={self.num_experts}, got {self.top_k}")
        if self.router == "modality":
            want = 3 if self.vl_from_layer >= 0 else 2
            check(self.num_experts == want, "num_experts",
                  f"modality routing uses expert 0 for image tokens, 1 for text tokens"
                  f"{' and 2 (vision-language) from moe.vl_from_layer on' if want == 3 else ''}; "
                  f"set model.moe.num_experts={want}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
