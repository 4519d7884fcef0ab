"""Peak host memory of building a frozen GPT-J-shaped LM from a checkpoint, per rank.

    python -m dodo.models.sources.membench --layers 1 2 --out /tmp/membench

Writes a random fp32 GPT-J-shaped checkpoint (d 4096, 16 heads, rotary 64, vocab 50400; the
given numbers of layers; sharded safetensors, as GPT-J ships) one tensor at a time, then builds
it in a FRESH subprocess per (mode, dtype) and reads that process's ru_maxrss:

  naive  GPTJForCausalLM(config) in fp32 on CPU (random init), load_state_dict(load_file(...)),
         then .to(dtype): a full fp32 copy plus the checkpoint, per rank
  meta   dodo's hf source: from_pretrained(dtype=..., low_cpu_mem_usage=True): built on the meta
         device, each memory-mapped shard loaded straight into the target dtype

Two layer counts give the cost per layer (the slope) and the fixed part (embeddings, head,
the Python/torch/transformers baseline); 28 layers = fixed + 28 * slope. Printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

D, HEADS, ROTARY, VOCAB, POSITIONS = 4096, 16, 64, 50400, 2048


def write_checkpoint(path: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import GPTJConfig

    path.mkdir(parents=True, exist_ok=True)
    GPTJConfig(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=D, n_layer=layers, n_head=HEADS,
               rotary_dim=ROTARY).save_pretrained(str(path))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.empty(*shape).normal_(std=0.02, generator=g)

    weight_map: dict[str, str] = {}
    shards: list[dict[str, torch.Tensor]] = [{"transformer.wte.weight": rnd(VOCAB, D)},
                                             {"lm_head.weight": rnd(VOCAB, D), "lm_head.bias": rnd(VOCAB),
                                              "transformer.ln_f.weight": torch.ones(D),
                                              "transformer.ln_f.bias": torch.zeros(D)}]
    for i in range(layers):
        h = f"transformer.h.{i}."
        shards.append({h + "ln_1.weight": torch.ones(D), h + "ln_1.bias": torch.zeros(D),
                       **{h + f"attn.{p}.weight": rnd(D, D) for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
                       h + "mlp.fc_in.weight": rnd(4 * D, D), h + "mlp.fc_in.bias": rnd(4 * D),
                       h + "mlp.fc_out.weight": rnd(D, 4 * D), h + "mlp.fc_out.bias": rnd(D)})
    total = 0
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * 4 for t in shard.values())
        shards[n] = {}  # free the shard before making the next
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))


class AnonPeak:
    """Samples /proc/self/status every 5 ms: the peak of RssAnon (private memory; ru_maxrss also
    counts the page cache of memory-mapped checkpoint files, which ranks on a node share)."""

    def __init__(self) -> None:
        import threading
        self.peak = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, _status_mib("RssAnon"))

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        return max(self.peak, _status_mib("RssAnon"))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def build(path: str, mode: str, dtype_name: str) -> None:
    """Runs in a fresh process; prints its peak resident set size in MiB."""
    import torch

    sampler = AnonPeak()

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    if mode == "naive":
        from safetensors.torch import load_file
        from transformers import AutoConfig, GPTJForCausalLM
        model = GPTJForCausalLM(AutoConfig.from_pretrained(path))
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                model.load_state_dict(load_file(os.path.join(path, name)), strict=False)
        model = model.to(dtype)
    else:
        from dodo.models.sources.config import SourceConfig
        from dodo.models.sources.hf import load_hf
        model = load_hf(SourceConfig(kind="hf", path=path, tower="lm", dtype=dtype_name))
    assert model.transformer.wte.weight.dtype == dtype
    print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "anon_mib": sampler.done()}))


def baseline() -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "anon_mib": _status_mib("RssAnon")}))


def measure(args: list[str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-m", "dodo.models.sources.membench", *args],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["maxrss_mib"], r["anon_mib"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs=2, default=[1, 2])
    p.add_argument("--out", default="/tmp/dodo-membench")
    p.add_argument("--build", nargs=3, metavar=("PATH", "MODE", "DTYPE"))
    p.add_argument("--baseline", action="store_true")
    args = p.parse_args()
    if args.build:
        return build(*args.build)
    if args.baseline:
        return baseline()
    base = measure(["--baseline"])
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for layers in args.layers:
        path = Path(args.out) / f"gptj-{layers}"
        write_checkpoint(path, layers)
        for mode in ("naive", "meta"):
            for dtype in ("float32", "bfloat16"):
                rows.setdefault((mode, dtype), []).append(measure(["--build", str(path), mode, dtype]))
        shutil.rmtree(path)
    a, b = args.layers
    print(f"baseline (python + torch + transformers): peak RSS {base[0] / 1024:.2f} GiB, "
          f"anonymous {base[1] / 1024:.2f} GiB\n")
    print(f"| build | dtype | measure | {a} layer(s) GiB | {b} layers GiB | per layer GiB | 28 layers GiB (scaled) |")
    print("|---|---|---|---|---|---|---|")
    for (mode, dtype), ((x, xa), (y, ya)) in rows.items():
        for label, u, v in (("peak RSS (ru_maxrss)", x, y), ("peak anonymous (RssAnon)", xa, ya)):
            slope = (v - u) / (b - a)
            print(f"| {mode} | {dtype} | {label} | {u / 1024:.2f} | {v / 1024:.2f} | {slope / 1024:.3f} | "
                  f"{(u + (28 - a) * slope) / 1024:.1f} |")


if __name__ == "__main__":
    main()
