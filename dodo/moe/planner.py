"""Expert placement: expert parallelism (experts split over ``ep`` ranks, tokens exchanged by
all-to-all) or replicated experts (every rank holds all E, their gradients all-reduced).

Torch-free: it runs at submit (``model.moe.ep_size: auto``, ``dodo submit --dry-run``). The cost
model is derived in docs/scaling.md; in short, per MoE layer, per GPU and per optimizer step:

    T   tokens per GPU per micro-step (micro_batch x sequence length)
    k   experts per token           d   model width          b  bytes per activation value
    E   experts                     p   parameters per expert  (bottleneck 2dh + h + d, LoRA 2dr)
    W   ranks = nodes x g           g   GPUs (ranks) per node   ep  expert-parallel group size

    all-to-all bytes sent  A(ep) = 4 T k d b (ep - 1) / ep        dispatch + combine, fwd + bwd
        of which off-node  A(ep) (ep - g) / (ep - 1)              when the group spans nodes
    expert grad all-reduce R(ep) = 2 (W/ep - 1) / (W/ep) * (E / ep) p g_b   ring, g_b = 4 (fp32 grads)
    expert compute         C = 6 T k p  FLOPs                                same for every ep

dodo's dispatch sends only the routed rows (no capacity padding), so with uniform routing A is
exact in expectation; tests/test_planner.py checks it against the bytes gloo moves. Times use
the profile's ``nvlink_gbps`` / ``network_gbps`` (GB/s, gigabytes): all-to-all traffic leaving
a node shares that node's network among its g GPUs; a ring all-reduce runs at its slowest link.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PlanInput:
    tokens_per_gpu: int  # T: tokens one rank routes per micro-step
    d_model: int  # d
    num_experts: int  # E
    top_k: int  # k (expert_choice: the average experts per token)
    expert_params: int  # p
    moe_layers: int  # L: MoE layers, each pays the costs above
    nodes: int
    gpus_per_node: int  # g: ranks per node
    nvlink_gbps: float = 0.0  # GB/s per GPU inside a node (0: unknown)
    network_gbps: float = 0.0  # GB/s per node between nodes (0: unknown)
    act_bytes: int = 2  # b: fp16 / bf16 activations (4 for fp32)
    grad_bytes: int = 4  # gradients reduced in fp32 (DeepSpeed's default for ZeRO 1/2)
    micro_steps: int = 1  # gradient accumulation: all-to-all per micro-step, all-reduce per step

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Estimate:
    ep_size: int
    a2a_intra_bytes: float  # per GPU per step, all MoE layers
    a2a_inter_bytes: float
    allreduce_bytes: float  # expert gradients, per GPU per step (ring: bytes each GPU sends)
    flops: float  # expert FLOPs per GPU per step (fwd + bwd)
    comm_seconds: float  # nan when the profile gives no bandwidths
    expert_params_per_gpu: int

    @property
    def comm_bytes(self) -> float:
        return self.a2a_intra_bytes + self.a2a_inter_bytes + self.allreduce_bytes


@dataclass
class Plan:
    ep_size: int
    estimates: list[Estimate] = field(default_factory=list)
    reason: str = ""

    def lines(self) -> list[str]:
        """For `dodo submit --dry-run`: the choice and the estimates it was chosen from."""
        out = [f"model.moe.ep_size: auto -> {self.ep_size} ({self.reason})"]
        for e in self.estimates:
            t = "" if e.comm_seconds != e.comm_seconds else f", ~{e.comm_seconds * 1e3:.2f} ms"
            what = "replicated experts" if e.ep_size == 1 else f"expert parallel over {e.ep_size} ranks"
            out.append(f"  {what}: all-to-all {_mb(e.a2a_intra_bytes)} intra + {_mb(e.a2a_inter_bytes)} "
                       f"inter-node, expert all-reduce {_mb(e.allreduce_bytes)} per GPU per step{t}; "
                       f"{e.expert_params_per_gpu:,} expert parameters per GPU")
        return out


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB"


def all_to_all_bytes(p: PlanInput, ep: int) -> tuple[float, float]:
    """(intra-node, inter-node) bytes one GPU sends per step, all MoE layers."""
    if ep <= 1:
        return 0.0, 0.0
    total = 4.0 * p.tokens_per_gpu * p.top_k * p.d_model * p.act_bytes * (ep - 1) / ep
    total *= p.moe_layers * p.micro_steps
    g = p.gpus_per_node
    inter = total * max(0, ep - g) / (ep - 1)  # peers of a contiguous group on other nodes
    return total - inter, inter


def allreduce_bytes(p: PlanInput, ep: int) -> float:
    """Bytes one GPU sends in the ring all-reduce of its experts' gradients, per step."""
    replicas = p.world // ep  # ranks holding the same experts
    if replicas <= 1:
        return 0.0
    payload = p.num_experts // ep * p.expert_params * p.moe_layers * p.grad_bytes
    return 2.0 * (replicas - 1) / replicas * payload


def estimate(p: PlanInput, ep: int) -> Estimate:
    intra, inter = all_to_all_bytes(p, ep)
    ar = allreduce_bytes(p, ep)
    nan = float("nan")
    seconds = nan
    if p.nvlink_gbps > 0 and (p.nodes == 1 or p.network_gbps > 0):
        gb = 1e9
        # Traffic leaving a node shares the node's network among its g GPUs.
        a2a = intra / (p.nvlink_gbps * gb) + (inter * p.gpus_per_node / (p.network_gbps * gb) if inter else 0.0)
        # The replicas of an expert (ranks r, r + ep, ...) span every node once nodes > 1, and a
        # ring runs at its slowest link.
        ring_bw = p.nvlink_gbps if p.nodes == 1 else min(p.nvlink_gbps, p.network_gbps)
        seconds = a2a + ar / (ring_bw * gb)
    flops = 6.0 * p.tokens_per_gpu * p.top_k * p.expert_params * p.moe_layers * p.micro_steps
    return Estimate(ep, intra, inter, ar, flops, seconds, p.num_experts // ep * p.expert_params * p.moe_layers)


def candidates(p: PlanInput) -> list[int]:
    return [e for e in range(1, p.world + 1) if p.world % e == 0 and p.num_experts % e == 0]


def choose(p: PlanInput, max_expert_params_per_gpu: int = 0) -> Plan:
    """The ep_size with the least estimated communication time (bytes when the profile has no
    bandwidths); ties go to the smaller group. ``max_expert_params_per_gpu`` (0: no limit)
    rules out placements whose experts do not fit."""
    ests = [estimate(p, e) for e in candidates(p)]
    fits = [e for e in ests if not max_expert_params_per_gpu or e.expert_params_per_gpu <= max_expert_params_per_gpu]
    pool = fits or ests[-1:]
    timed = all(e.comm_seconds == e.comm_seconds for e in pool)
    best = min(pool, key=lambda e: ((e.comm_seconds if timed else e.comm_bytes), e.ep_size))
    basis = "least estimated communication time" if timed else \
        "least communicated bytes (the cluster profile has no nvlink_gbps / network_gbps)"
    if len(fits) < len(ests):
        basis += f"; placements over {max_expert_params_per_gpu:,} expert parameters per GPU ruled out"
    shown = [e for e in ests if e.ep_size == 1] + ([best] if best.ep_size != 1 else
                                                    [min((e for e in ests if e.ep_size > 1),
                                                         key=lambda e: e.comm_bytes, default=None)])
    return Plan(best.ep_size, [e for e in shown if e is not None], basis)


# --- from a job config (duck-typed: runs on JobConfig without importing torch) ---------------

def expert_params(moe: Any, adapter: Any, d_model: int) -> int:
    """Parameters of one expert, as dodo builds it (BottleneckAdapter / LoRAExpert)."""
    if moe.expert == "lora":
        return 2 * d_model * adapter.lora.r
    h = max(1, d_model // adapter.downsample)
    ln = 2 * d_model if getattr(adapter, "layer_norm", False) else 0
    return 2 * d_model * h + h + d_model + ln


def plan_input(cfg: Any) -> PlanInput:
    """The planner's inputs from a JobConfig (``cfg.model``, ``cfg.train``, ``cfg.data``,
    ``cfg.cluster``). Sequence length: caption tokens plus the image prefix tokens the LM sees."""
    m, moe, c = cfg.model, cfg.model.moe, cfg.cluster
    lm = getattr(m, "lm", None)  # families without an `lm` section: the defaults below (GPT-2 small)
    d = int(getattr(lm, "d_model", 0) or getattr(lm, "hidden_size", 0) or 768)
    n_layer = int(getattr(lm, "n_layer", 0) or getattr(lm, "num_layers", 0) or 12)
    prefix = int(getattr(getattr(m, "image_encoder", None), "prefix_tokens", 0) or 0)
    seq = cfg.data.max_caption_tokens + prefix
    precision = getattr(cfg.train, "precision", "auto")
    gpus = c.gpus_per_task > 0
    return PlanInput(
        tokens_per_gpu=cfg.train.micro_batch * seq, d_model=d, num_experts=moe.num_experts,
        top_k=moe.top_k if moe.router in ("topk", "expert_choice") else 1,
        expert_params=expert_params(moe, m.adapter, d), moe_layers=len(moe.layers) or n_layer,
        nodes=c.nodes, gpus_per_node=c.tasks_per_node,
        nvlink_gbps=float(getattr(c, "nvlink_gbps", 0.0) or 0.0),
        network_gbps=float(getattr(c, "network_gbps", 0.0) or 0.0),
        act_bytes=2 if gpus and precision != "fp32" else 4,
        micro_steps=cfg.train.grad_accum)


def choose_for(cfg: Any) -> Plan:
    return choose(plan_input(cfg))
