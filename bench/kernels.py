"""Roofline benchmark of dodo's fused kernels (docs/kernels.md, docs/benchmarks.md).

    python bench/kernels.py                 # every case, fp16 and bf16, markdown to stdout
    python bench/kernels.py --quick         # one shape per op
    python bench/kernels.py --ops lora,moe --dtypes bf16 --out results.json
    python bench/kernels.py --list          # the cases, without measuring (works on CPU)

For each case: forward and forward+backward time (median of triton.testing.do_bench), the
achieved GB/s over the op's essential bytes and its % of the device copy bandwidth measured
in the same run, TFLOP/s, and the speedup of the fused kernel over the PyTorch reference and
over the peers that import here: PEFT's LoRA layer, DeepSpeed's MoE layer (ep_size 1),
scattermoe / megablocks. Needs CUDA; on a machine without it, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Case:
    op: str
    shape: dict
    dtype: str
    fwd_bytes: int = 0  # essential bytes: activations in and out once, weights once
    bwd_bytes: int = 0
    fwd_flops: int = 0
    results: dict = field(default_factory=dict)  # impl -> {"fwd_ms", "fwdbwd_ms"}

    @property
    def name(self) -> str:
        return f"{self.op} " + " ".join(f"{k}={v}" for k, v in self.shape.items()) + f" {self.dtype}"


def cases(quick: bool, ops: list[str], dtypes: list[str]) -> list[Case]:
    grid = {
        "lora": [dict(tokens=t, d=d, rank=r) for t, d, r in
                 [(8192, 1024, 8), (16384, 4096, 16), (65536, 4096, 64), (32768, 2048, 32)]],
        "bottleneck": [dict(tokens=t, d=d, hidden=h, placement=p) for t, d, h, p in
                       [(8192, 1024, 64, "sequential"), (16384, 4096, 64, "sequential"),
                        (65536, 4096, 128, "parallel"), (32768, 2048, 32, "sequential")]],
        "moe": [dict(tokens=t, d=d, experts=e, k=k, hidden=h) for t, d, e, k, h in
                [(8192, 1024, 8, 1, 64), (16384, 4096, 8, 2, 64), (32768, 2048, 64, 2, 32),
                 (65536, 4096, 16, 1, 128)]],
        "router": [dict(tokens=t, experts=e, k=k) for t, e, k in
                   [(8192, 8, 1), (16384, 8, 2), (65536, 64, 2), (32768, 16, 2)]],
    }
    out = []
    for op in ops:
        for shape in grid[op][:1] if quick else grid[op]:
            for dt in dtypes:
                out.append(roofline(Case(op, shape, dt)))
    return out


def roofline(c: Case) -> Case:
    s, sh = DTYPES[c.dtype].itemsize, c.shape
    t = sh["tokens"]
    if c.op == "lora":
        d, r = sh["d"], sh["rank"]
        c.fwd_bytes = s * (t * d + 2 * t * d) + 4 * t * r + s * 2 * d * r  # x, base in; y out
        c.bwd_bytes = s * (t * d + 2 * t * d)  # g in, x in, dx out
        c.fwd_flops = 2 * t * r * 2 * d
    elif c.op == "bottleneck":
        d, h = sh["d"], sh["hidden"]
        acts = 2 if sh["placement"] == "sequential" else 3  # x (+ f(x)) in, y out
        c.fwd_bytes = s * acts * t * d + 4 * t * h + s * 2 * d * h
        c.bwd_bytes = s * 3 * t * d
        c.fwd_flops = 4 * t * d * h
    elif c.op == "moe":
        d, e, k, h = sh["d"], sh["experts"], sh["k"], sh["hidden"]
        c.fwd_bytes = s * 3 * t * d + 4 * t * k * h + s * e * 2 * d * h  # x, res in; y out
        c.bwd_bytes = s * 3 * t * d
        c.fwd_flops = 4 * t * k * d * h
    else:
        e, k = sh["experts"], sh["k"]
        c.fwd_bytes = (s + 4) * t * e + 16 * t * k  # logits in, fp32 probs out, ids/weights/order/position
        c.bwd_bytes = (8 + s) * t * e + 8 * t * k  # probs, dprobs in; dlogits out
        c.fwd_flops = 5 * t * e
    return c


def copy_bandwidth(dev: torch.device) -> float:
    """Device-to-device copy GB/s (bytes read + written), 1 GiB buffers."""
    from triton.testing import do_bench
    src = torch.empty(1 << 29, dtype=torch.float16, device=dev)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return 2 * src.numel() * src.itemsize / ms / 1e6


def build(c: Case, dev: torch.device) -> dict[str, Callable[[], tuple]]:
    """impl name -> a closure returning (output, inputs that need grad)."""
    import dodo_kernels as dk
    dt, sh = DTYPES[c.dtype], c.shape
    t = sh["tokens"]
    rand = lambda *s, std=1.0: (torch.randn(*s, device=dev) * std).to(dt).requires_grad_()  # noqa: E731
    impls: dict[str, Callable] = {}
    if c.op == "lora":
        d, r = sh["d"], sh["rank"]
        x, a, b, base = rand(t, d), rand(r, d, std=0.02), rand(d, r, std=0.02), rand(t, d)
        impls["fused"] = lambda: (dk.lora(x, a, b, base, 2.0), (x, a, b, base))
        impls["reference"] = lambda: (dk.lora_reference(x, a, b, base, 2.0), (x, a, b, base))
        try:  # PEFT's layer computes base(x) too: compare with ours plus the same base matmul
            from peft.tuners.lora import Linear as PeftLinear
            lin = torch.nn.Linear(d, d, bias=False, device=dev, dtype=dt).requires_grad_(False)
            peft = PeftLinear(lin, "default", r=r, lora_alpha=2 * r, lora_dropout=0.0)
            peft.to(device=dev, dtype=dt)
            impls["peft"] = lambda: (peft(x), (x,) + tuple(p for p in peft.parameters() if p.requires_grad))
            impls["fused+base"] = lambda: (dk.lora(x, a, b, lin(x), 2.0), (x, a, b))
        except Exception as err:  # noqa: BLE001
            print(f"# peft unavailable: {err}", file=sys.stderr)
    elif c.op == "bottleneck":
        d, h = sh["d"], sh["hidden"]
        x, res = rand(t, d), rand(t, d)
        w = [rand(h, d, std=0.02), rand(h, std=0.02), rand(d, h, std=0.02), rand(d, std=0.02)]
        r = x if sh["placement"] == "sequential" else res
        impls["fused"] = lambda: (dk.bottleneck_adapter(x, *w, r), (x, *w))
        impls["reference"] = lambda: (dk.bottleneck_reference(x, *w, r), (x, *w))
    elif c.op == "moe":
        d, e, k, h = sh["d"], sh["experts"], sh["k"], sh["hidden"]
        x = rand(t, d)
        logits = torch.randn(t, e, device=dev)
        routing = dk.route_topk_reference(logits, k, normalize=k > 1)
        gates = routing.weights.clone().requires_grad_()
        w = [rand(e, h, d, std=0.02), rand(e, h, std=0.02), rand(e, d, h, std=0.02), rand(e, d, std=0.02)]
        impls["fused"] = lambda: (dk.moe_adapter_experts(x, gates, routing.order, routing.offsets, *w, x),
                                  (x, gates, *w))
        impls["reference"] = lambda: (dk.moe_experts_reference(x, gates, routing.order, routing.offsets,
                                                                *w, x), (x, gates, *w))
        impls.update(peers_moe(c, dev, x))
    else:
        e, k = sh["experts"], sh["k"]
        logits = torch.randn(t, e, device=dev, dtype=dt).requires_grad_()
        impls["fused"] = lambda: (dk.route_topk(logits, k, True).weights, (logits,))
        impls["reference"] = lambda: (dk.route_topk_reference(logits, k, True).weights, (logits,))
    return impls


def peers_moe(c: Case, dev: torch.device, x: torch.Tensor) -> dict[str, Callable]:
    """DeepSpeed's MoE layer (top-k gate + einsum dispatch + experts, ep_size 1) with the same
    bottleneck experts; scattermoe where it installs."""
    sh, dt = c.shape, DTYPES[c.dtype]
    d, e, k, h = sh["d"], sh["experts"], sh["k"], sh["hidden"]
    out: dict[str, Callable] = {}
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE
        if not torch.distributed.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29533")
            deepspeed.init_distributed(dist_backend="nccl", rank=0, world_size=1, verbose=False)
        expert = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, d))
        layer = MoE(hidden_size=d, expert=expert, num_experts=e, ep_size=1, k=k,
                    capacity_factor=1.25, eval_capacity_factor=1.25, drop_tokens=True).to(dev, dt)
        xb = x.detach().reshape(1, -1, d).requires_grad_()
        out["deepspeed"] = lambda: (layer(xb)[0], (xb,) + tuple(layer.parameters()))
    except Exception as err:  # noqa: BLE001
        print(f"# deepspeed MoE unavailable: {err}", file=sys.stderr)
    try:
        import scattermoe  # noqa: F401
        print("# scattermoe importable: its MLP uses 2-layer experts; add a wrapper here", file=sys.stderr)
    except Exception:  # noqa: BLE001
        print("# scattermoe / megablocks not installed", file=sys.stderr)
    return out


def measure(c: Case, dev: torch.device) -> None:
    from triton.testing import do_bench
    for impl, fn in build(c, dev).items():
        os.environ["DODO_KERNELS"] = "triton" if impl.startswith("fused") else "reference"
        try:
            fwd = do_bench(lambda: fn()[0], warmup=10, rep=50)

            def fwd_bwd():
                y, ins = fn()
                torch.autograd.backward(y, torch.ones_like(y), inputs=[i for i in ins if i.requires_grad])
            both = do_bench(fwd_bwd, warmup=5, rep=50, grad_to_none=None)
            c.results[impl] = {"fwd_ms": fwd, "fwdbwd_ms": both}
        except Exception as err:  # noqa: BLE001
            c.results[impl] = {"error": f"{type(err).__name__}: {err}"[:200]}
    os.environ.pop("DODO_KERNELS", None)


def table(cs: list[Case], copy_gbs: float) -> str:
    rows = ["| case | impl | fwd ms | fwd GB/s | % copy BW | fwd TFLOP/s | fwd+bwd ms | fwd+bwd % copy BW | speedup fwd / fwd+bwd vs fused |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in cs:
        fused = c.results.get("fused", {})
        for impl, r in c.results.items():
            if "error" in r:
                rows.append(f"| {c.name} | {impl} | {r['error']} | | | | | | |")
                continue
            gbs = c.fwd_bytes / r["fwd_ms"] / 1e6
            both_gbs = (c.fwd_bytes + c.bwd_bytes) / r["fwdbwd_ms"] / 1e6
            sp = (f"{r['fwd_ms'] / fused['fwd_ms']:.2f}x / {r['fwdbwd_ms'] / fused['fwdbwd_ms']:.2f}x"
                  if "fwd_ms" in fused and impl != "fused" else "")
            rows.append(f"| {c.name} | {impl} | {r['fwd_ms']:.3f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | "
                        f"{c.fwd_flops / r['fwd_ms'] / 1e9:.1f} | {r['fwdbwd_ms']:.3f} | "
                        f"{100 * both_gbs / copy_gbs:.0f}% | {sp} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default="lora,bottleneck,moe,router")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--quick", action="store_true", help="one shape per op")
    ap.add_argument("--list", action="store_true", help="print the cases and their rooflines only")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    ops, dtypes = args.ops.split(","), args.dtypes.split(",")
    bad = [o for o in ops if o not in ("lora", "bottleneck", "moe", "router")] + \
          [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown op or dtype {bad}; ops: lora,bottleneck,moe,router; dtypes: fp16,bf16")
    cs = cases(args.quick, ops, dtypes)
    if args.list:
        for c in cs:
            print(f"{c.name}: fwd {c.fwd_bytes / 1e6:.1f} MB, bwd {c.bwd_bytes / 1e6:.1f} MB, "
                  f"fwd {c.fwd_flops / 1e9:.2f} GFLOP")
        return 0
    if not torch.cuda.is_available():
        print("bench/kernels.py: needs a CUDA GPU (none found); nothing measured. "
              "Use --list to see the cases; the kernels' correctness is tested on CPU by "
              "tests/test_kernels_*.py under TRITON_INTERPRET=1.")
        return 0
    dev = torch.device("cuda")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    copy_gbs = copy_bandwidth(dev)
    head = (f"device: {torch.cuda.get_device_name(dev)}, date: {datetime.date.today()}, commit: {commit}, "
            f"torch {torch.__version__}, measured copy bandwidth: {copy_gbs:.0f} GB/s")
    for c in cs:
        measure(c, dev)
        print(f"# done: {c.name}", file=sys.stderr)
    print(head + "\n\n" + table(cs, copy_gbs))
    if args.out:
        args.out.write_text(json.dumps({"header": head, "copy_gbs": copy_gbs,
                                        "cases": [c.__dict__ for c in cs]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
