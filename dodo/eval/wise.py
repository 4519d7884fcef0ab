"""WiSE-FT: interpolate between the pretrained (zero-shot) weights and the tuned ones.

    theta(alpha) = (1 - alpha) theta_0 + alpha theta_ft      alpha = 0: zero-shot, 1: tuned

theta_0, the pretrained point, is stored once per run (``save_pretrained_state``, at the start
of training, before any step: <run>/pretrained_state.safetensors; a resume never rewrites it).
It holds ``zero_shot_state`` of the fresh model: every trainable tensor at its starting value
(full fine-tuning: the pretrained weights; projections, temperature) and every adapter's
output parameters at zero (the adapter adds nothing: the identity).

The interpolated point (``wise_zero_point``) takes, per key:
  - a tensor outside the adapter modules (full fine-tuning, heads): the stored value, so the
    curve interpolates the weights themselves (before this store, full fine-tuning had a flat
    curve: its "zero-shot" state was the tuned state);
  - an adapter's output parameters (LoRA B, bottleneck up, R-Adapter s and its EMA/BMA s~,
    FiLM gamma / beta): zero; its other parameters stay tuned. The adapter's contribution is
    then exactly alpha times the tuned one, which for the linear adapters IS the interpolation
    of the merged weights: LoRA W + alpha (a/r) B A; R-Adapter W_l (I + alpha s~ W~_adp), i.e.
    the paper's re-scaling with coefficient alpha. During a curve every R-Adapter's own
    re-scaling alpha is set to 1, so the curve's alpha is that coefficient (restored after).
Prefix tuning has no such zero (its output params are none): its tensors stay tuned.

Written as a Markdown table, JSON and a PNG curve (one line per metric).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from dodo.adapters.state import adapter_modules, adapter_state_dict, load_adapter_state, wise_state, zero_shot_state

PRETRAINED_FILE = "pretrained_state.safetensors"


def save_pretrained_state(run_dir: str | os.PathLike, model: nn.Module) -> Optional[Path]:
    """Write the fresh model's zero-shot state once (atomically: temp file, rename); None when the
    file is already there (a resume, or another allocation of the same run: never overwritten)."""
    from safetensors.torch import save_file

    path = Path(run_dir) / PRETRAINED_FILE
    if path.exists():
        return None
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in zero_shot_state(model).items()}, str(tmp))
    os.replace(tmp, path)
    return path


def load_pretrained_state(run_dir: str | os.PathLike) -> Optional[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    path = Path(run_dir) / PRETRAINED_FILE
    return load_file(str(path)) if path.is_file() else None


def _in_adapter(key: str, prefixes: list[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def wise_zero_point(model: nn.Module, pretrained: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """theta_0 over the model's adapter state (the key set of ``adapter_state_dict``): adapters
    at their identity (output parameters zero), every other trainable tensor from ``pretrained``
    (the stored file). Without ``pretrained`` those tensors stay tuned (the flat old curve)."""
    zero = zero_shot_state(model)
    if pretrained is None:
        return zero
    prefixes = [f"{p}." for p, _ in adapter_modules(model) if p]
    own = [k for k in zero if not _in_adapter(k, prefixes)]
    missing = [k for k in own if k not in pretrained]
    if missing:
        raise ValueError(f"the stored pretrained state lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}: "
                         "the run trains tensors it did not store at its start (model.clip.trainable or "
                         "model.adapter changed?); WiSE needs the run's own pretrained_state.safetensors")
    for k in own:
        if pretrained[k].shape != zero[k].shape:
            raise ValueError(f"stored pretrained {k} has shape {tuple(pretrained[k].shape)}, the model "
                             f"{tuple(zero[k].shape)}")
        zero[k] = pretrained[k].to(zero[k].dtype)
    return zero


def _rescaling_off(model: nn.Module) -> dict[nn.Module, float]:
    """Set every R-Adapter's evaluation re-scaling alpha to 1 (WiSE's alpha takes its place)."""
    from dodo.adapters.r_adapter import RAdapterLinear

    saved = {m: m.alpha for _, m in adapter_modules(model) if isinstance(m, RAdapterLinear)}
    for m in saved:
        if getattr(m, "merged", False):
            raise ValueError("WiSE needs unmerged adapters (call dodo.adapters.state.unmerge_adapters)")
        m.alpha = 1.0
    return saved


def wise_curve(model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]], alphas: Sequence[float],
               zero_point: Optional[dict[str, torch.Tensor]] = None) -> list[dict[str, float]]:
    """Evaluate the model at each alpha; the tuned weights (and R-Adapter alphas) are restored
    afterwards. ``zero_point``: theta_0 (``wise_zero_point``); default: adapters at identity."""
    tuned = adapter_state_dict(model)
    zero = zero_point if zero_point is not None else zero_shot_state(model)
    saved = _rescaling_off(model)
    rows = []
    try:
        for alpha in alphas:
            load_adapter_state(model, wise_state(zero, tuned, float(alpha)))
            rows.append({"alpha": float(alpha), **evaluate(model)})
    finally:
        load_adapter_state(model, tuned)
        for m, a in saved.items():
            m.alpha = a
    return rows


def markdown_table(rows: list[dict[str, float]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def write_curve(rows: list[dict[str, float]], out_dir: Path, name: str = "wise") -> dict[str, Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
    (out_dir / f"{name}.md").write_text(markdown_table(rows) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    alphas = [r["alpha"] for r in rows]
    for key in rows[0]:
        if key != "alpha":
            ax.plot(alphas, [r[key] for r in rows], marker="o", label=key)
    ax.set_xlabel("alpha (0: zero-shot, 1: adapted)")
    ax.set_ylabel("metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    plt.close(fig)
    return {k: out_dir / f"{name}.{k}" for k in ("json", "md", "png")}
