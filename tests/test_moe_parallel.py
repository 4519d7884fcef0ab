"""Expert parallelism with real processes: 2 ranks on gloo, tokens exchanged by all-to-all.

1. The layer: EP=2 on 2 ranks gives the outputs and gradients of EP=1 data parallelism on the
   same global batch (rank r's tokens are the same in both; capacity is per rank in both).
2. The whole run: `dodo submit jobs/moe_demo.yaml` (ZeRO-2, ep_size 2) trains, logs the MoE
   statistics, writes expert checkpoints, and a stopped-and-resumed run is bitwise identical
   to a straight one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO, TINY, dodo, metrics, run_dirs

pytestmark = [pytest.mark.multiprocess]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_layer(cfg):
    from dodo.adapters.bottleneck import BottleneckAdapter
    from dodo.adapters.config import AdapterConfig
    from dodo.moe.layer import MoEAdapter, RoutingContext
    from dodo.moe.routers import TopKRouter

    torch.manual_seed(0)
    experts = [BottleneckAdapter(8, AdapterConfig(downsample=2, init_std=0.3)) for _ in range(cfg.num_experts)]
    return MoEAdapter(experts, TopKRouter(8, cfg), cfg, RoutingContext(), layer_index=0)


def _ep_worker(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from dodo.moe.config import MoEConfig

    from datetime import timedelta
    # A collective mismatch hangs gloo until its timeout: fail in a minute, not thirty.
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=timedelta(seconds=60))
    for dropless in (False, True):
        _check_ep_equals_ep1(rank, MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=2,
                                             dropless=dropless, aux_loss=0.1, z_loss=0.01))
    # Every token of both ranks routed to rank 1's experts: rank 0 computes nothing, yet both
    # ranks must run the same all-to-alls in backward (dropless top-1 after upcycling did not).
    for top_k in (1, 2):
        _check_ep_equals_ep1(rank, MoEConfig(num_experts=4, top_k=top_k, dropless=True, aux_loss=0.1,
                                             z_loss=0.01), skew=True)
    dist.barrier()
    dist.destroy_process_group()


def _check_ep_equals_ep1(rank: int, cfg, skew: bool = False) -> None:
    import torch.distributed as dist

    ref, ep = _make_layer(cfg), _make_layer(replace(cfg, ep_size=2))
    if skew:  # positive inputs (below), so experts 0 and 1 always score below 2 and 3
        for layer in (ref, ep):
            with torch.no_grad():
                layer.deepspeed_moe.gate.wg.weight[:2] = -1.0
                layer.deepspeed_moe.gate.wg.weight[2:].abs_()
    ep.set_deepspeed_parallelism()  # what DeepSpeed's engine calls: groups + this rank's experts
    assert list(ep.global_expert_ids()) == [2 * rank, 2 * rank + 1]
    torch.manual_seed(1)
    x, g = torch.randn(2, 3, 7, 8, dtype=torch.float64), torch.randn(2, 3, 7, 8)  # global batch
    if skew:
        x = x.abs() + 0.1
    ref.double(), ep.double()

    # EP=1 reference, in this process: the loss summed over both ranks' batches.
    xr = x.clone().requires_grad_()
    ref_out, ref_aux, total = [], [], 0
    for r in range(2):
        ref_out.append(ref(xr[r]))
        ref_aux.append(ref.last_aux_loss)
        total = total + (ref_out[r] * g[r]).sum() + ref.last_aux_loss
    total.backward()

    # EP=2: this rank's share only; gradients summed over ranks like data parallelism does.
    xe = x[rank].clone().requires_grad_()
    out = ep(xe)
    ((out * g[rank]).sum() + ep.last_aux_loss).backward()
    router_grad = ep.deepspeed_moe.gate.wg.weight.grad.clone()
    dist.all_reduce(router_grad)

    tol = dict(atol=1e-10, rtol=1e-10)
    assert torch.allclose(out, ref_out[rank], **tol)
    assert torch.allclose(ep.last_aux_loss, ref_aux[rank], **tol)
    assert torch.allclose(xe.grad, xr.grad[rank], **tol)
    assert torch.allclose(router_grad, ref.deepspeed_moe.gate.wg.weight.grad, **tol)
    for local, e in zip(ep.local_experts, ep.global_expert_ids()):
        for (name, p), q in zip(local.named_parameters(), ref.local_experts[e].parameters()):
            # An expert that got no token may have no gradient at all (the same on both paths).
            pg, qg = (t.grad if t.grad is not None else torch.zeros_like(t) for t in (p, q))
            assert torch.allclose(pg, qg, **tol), (e, name)
            assert p.allreduce is False and p.group_name == "ep_size_2"

    # Replicated experts: the same outputs without any exchange (rank 0 alone may run it).
    ep.replicate()
    with torch.no_grad():
        assert torch.allclose(ep(x[rank]), ref_out[rank], **tol)
        if rank == 0:
            assert torch.allclose(ep(x[1]), ref_out[1], **tol)  # rank 1's tokens, rank 0 alone
    ep.drop_replicas()


def test_ep2_equals_ep1_outputs_and_gradients():
    """Capacity dropping (factor 1.0, so some tokens are dropped), dropless, and dropless with
    every token on one rank's experts."""
    mp.spawn(_ep_worker, args=(_free_port(),), nprocs=2, join=True)


# ---------------------------------------------------------------- the real run under DeepSpeed

JOB = str(REPO / "jobs/moe_demo.yaml")
MOE_TINY = TINY + ["train.steps=8", "train.save_every=4"]


def _trainable(run: Path) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    state = dict(torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    for f in sorted(ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update({f"{f.name}:{k}": v for k, v in torch.load(f, weights_only=False).items()})
    return state


@pytest.mark.slow
def test_moe_demo_trains_with_ep_and_resumes_bitwise(tmp_path: Path):
    straight = dodo("submit", JOB, *MOE_TINY, f"runs_dir={tmp_path}/a", cwd=tmp_path)
    assert "summary of moe_demo" in straight.stdout
    (a,) = run_dirs(tmp_path / "a", "moe_demo")
    rows = [r for r in metrics(a) if "moe.load" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(len(r["moe.load"]) == 4 and 0 <= r["moe.dropped"] < 1 and r["moe.entropy"] > 0 for r in rows)
    ckpt = a / "checkpoints" / "step_00000008"
    experts = sorted(p.name for p in ckpt.glob("layer_*_expert_*"))
    assert len(experts) == 2 * 4  # 2 MoE layers x 4 experts, one file per global expert
    assert "No existing process group found, creating a new group named: ep_size_2" in \
        (a / "job/logs/rank_0.log").read_text()

    first = dodo("submit", JOB, *MOE_TINY, "train.steps_per_allocation=4", f"runs_dir={tmp_path}/b", cwd=tmp_path)
    assert first.returncode == 3 and "stopped at step 4/8" in first.stdout
    (b,) = run_dirs(tmp_path / "b", "moe_demo")
    assert dodo("submit", str(b), cwd=tmp_path).returncode == 0
    la = {r["step"]: r["train.loss"] for r in metrics(a) if "train.loss" in r}
    lb = {r["step"]: r["train.loss"] for r in metrics(b) if "train.loss" in r}
    assert la == lb  # bitwise, step by step
    sa, sb = _trainable(a), _trainable(b)
    assert sa.keys() == sb.keys() and any("expert" in k for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    # A different world size is refused before anything starts, naming the fix.
    config = b / "config.yaml"
    config.write_text(config.read_text().replace("tasks_per_node: 2", "tasks_per_node: 1"))
    refused = dodo("submit", str(b), cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert "model.moe.ep_size: must divide the world size 1, got 2" in refused.stderr
