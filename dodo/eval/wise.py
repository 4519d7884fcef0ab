"""WiSE-style interpolation between the zero-shot and the adapted weights.

theta(alpha) = (1 - alpha) theta_zero_shot + alpha theta_adapted over the adapter state, where
the zero-shot state has every adapter's output parameters at zero (``zero_shot_state``):
alpha = 0 is the frozen model, alpha = 1 the adapted one. Written as a Markdown table, JSON
and a PNG curve (one line per metric).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from dodo.adapters.state import adapter_state_dict, load_adapter_state, wise_state, zero_shot_state


def wise_curve(model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]],
               alphas: Sequence[float]) -> list[dict[str, float]]:
    """Evaluate the model at each alpha; the adapted weights are restored afterwards."""
    tuned, zero = adapter_state_dict(model), zero_shot_state(model)
    rows = []
    try:
        for alpha in alphas:
            load_adapter_state(model, wise_state(zero, tuned, float(alpha)))
            rows.append({"alpha": float(alpha), **evaluate(model)})
    finally:
        load_adapter_state(model, tuned)
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
