"""WeightWatcher's heavy-tailed self-regularisation metric: the power-law exponent alpha of each
layer's empirical spectral density (the eigenvalues of W^T W), fitted by the `weightwatcher`
package (Martin & Mahoney). Smaller alpha (2-4) is read as better-trained layers; > 6 as
under-trained ones. We use the package, not a hand-written fit: its xmin search and its
power-law MLE (through `powerlaw`) are the metric everyone quotes.

What is analysed: every nn.Linear (and GPT-2 Conv1D, transposed to (out, in)) of the model as
it is evaluated: linear adapters (LoRA, R-Adapter with its EMA and re-scaling) are merged into
their layers first (and unmerged after), so the alphas are those of the tuned weights; the other
adapters' own linear maps are layers of their own. Conv patch embeddings are not analysed.
The matrices are handed over as float32 CPU copies in a plain container (the package reads
numpy arrays: bf16 / GPU weights would not convert), named by their module path.

Outputs: ``weightwatcher.alpha_mean`` (mean over the layers with a finite fit) and
``weightwatcher.layers`` in summary.json (eval.weightwatcher: true, dodo/train/loop.py) or in
<run>/eval/weightwatcher.json (`dodo eval RUN --weightwatcher`); the per-layer table goes to
weightwatcher_layers.json beside it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

LAYERS_FILE = "weightwatcher_layers.json"


def _matrices(model: nn.Module, merged: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """{module path: (out, in) float32 CPU weight} of every linear layer; inside the adapters
    named in ``merged`` (prefixes "a.b.") only their ``base`` (it holds the merged update)."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, m in model.named_modules():
        inside = next((p for p in merged if name.startswith(p)), None)
        if inside is not None and not name.startswith(f"{inside}base"):
            continue  # LoRA's A / B: their product is already in the merged base weight
        if isinstance(m, nn.Linear):
            out[name] = m.weight.detach().float().cpu()
        elif isinstance(m, Conv1D):  # y = x W + b: W is (in, out)
            out[name] = m.weight.detach().float().cpu().T
    return out


def _holder(mats: dict[str, torch.Tensor]) -> nn.Module:
    """A container of plain nn.Linear layers with these weights (module names without dots)."""
    holder = nn.Module()
    for i, (name, w) in enumerate(mats.items()):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        holder.add_module(f"l{i}", lin)
    return holder


def fit_alphas(mats: dict[str, torch.Tensor], min_evals: int = 8) -> list[dict[str, Any]]:
    """Per matrix: {"layer", "shape", "alpha", "xmin", "num_pl_spikes"}; matrices with fewer
    than ``min_evals`` eigenvalues (min(out, in)) are skipped by the package."""
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)  # its per-layer progress chatter
    with contextlib.redirect_stdout(io.StringIO()):  # "PyTorch is available but CUDA is not ..." at import
        import weightwatcher as ww
    names = list(mats)
    if not names:
        return []
    details = ww.WeightWatcher(model=_holder(mats)).analyze(min_evals=min_evals)
    rows = []
    for rec in details.to_dict("records"):
        name = names[int(str(rec["name"]).removeprefix("l"))]
        alpha = float(rec.get("alpha", float("nan")))
        rows.append({"layer": name, "shape": list(mats[name].shape), "alpha": alpha,
                     "xmin": float(rec.get("xmin", float("nan"))),
                     "num_pl_spikes": int(rec.get("num_pl_spikes", 0) or 0)})
    return rows


def analyze(model: nn.Module) -> list[dict[str, Any]]:
    """Layer alphas of the model as evaluated (linear adapters merged for the fit)."""
    from dodo.adapters.state import adapter_modules, unmerge_adapters

    mergeable = [(n, m) for n, m in adapter_modules(model) if hasattr(m, "merge") and not getattr(m, "merged", False)]
    for _, m in mergeable:
        m.merge()
    try:
        return fit_alphas(_matrices(model, tuple(f"{n}." for n, _ in mergeable)))
    finally:
        if mergeable:
            unmerge_adapters(model)


def metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    finite = [r["alpha"] for r in rows if math.isfinite(r["alpha"])]
    return {"weightwatcher.alpha_mean": sum(finite) / len(finite) if finite else float("nan"),
            "weightwatcher.layers": float(len(finite))}


def report(model: nn.Module, out_dir: Path) -> tuple[dict[str, float], list[str]]:
    """Fit, write the per-layer table to out_dir/weightwatcher_layers.json, return the metrics."""
    from dodo.rundir import write_json_atomic

    rows = analyze(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / LAYERS_FILE, rows)
    found = metrics(rows)
    return found, [f"  weightwatcher.alpha_mean    {found['weightwatcher.alpha_mean']:.3f} over "
                   f"{int(found['weightwatcher.layers'])} layers ({out_dir / LAYERS_FILE})"]
