"""End-of-run summary: summary.json, a loss-curve PNG and the text a researcher reads first."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from dodo.config.metric_keys import dataset_tags
from dodo.config.schema import JobConfig
from dodo.rundir import RunDir, write_json_atomic
from dodo.train.metrics import format_duration, read_metrics


def plot_losses(run: RunDir) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run.metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train.loss", "train loss"), ("eval.loss", "held-out loss")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval.loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(run.path.parent.name)
    path = run.plots / "loss.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(run: RunDir, cfg: JobConfig, initial: dict[str, float], final: dict[str, float],
                  report: Sequence[str], train_seconds: float, world_size: int, trainable: int,
                  total_params: int) -> dict:
    train_losses = [r["train.loss"] for r in read_metrics(run.metrics) if "train.loss" in r]
    created = run.status().get("created")
    summary = {
        "name": cfg.name,
        "steps": cfg.train.steps,
        "world_size": world_size,
        "trainable_parameters": trainable,
        "total_parameters": total_params,
        "initial": initial,
        "final": final,
        "final_train_loss": train_losses[-1] if train_losses else None,
        # each suite dataset tagged id / ood, for `dodo table --layout idood` (dodo/config/metric_keys.py)
        "eval_datasets": dataset_tags(getattr(cfg.eval, "suites", None) or []),
        "train_seconds_this_allocation": train_seconds,
        "wall_seconds": time.time() - created if created else train_seconds,
        "loss_plot": str(plot_losses(run)),
    }
    write_json_atomic(run.summary_file, summary)
    print("\n".join([*report, "", render_summary(run, summary)]), flush=True)
    return summary


def _format_metric(key: str, value: float) -> str:
    return f"{100 * value:.1f}%" if key.endswith("accuracy") else f"{value:.4f}"


def render_summary(run: RunDir, s: dict) -> str:
    first, last = s["initial"]["eval.loss"], s["final"]["eval.loss"]
    lines = [
        f"summary of {s['name']}",
        f"  steps              {s['steps']} on {s['world_size']} ranks",
        f"  parameters         {s['trainable_parameters']:,} trainable of {s['total_parameters']:,}",
        f"  held-out loss      {first:.4f} -> {last:.4f} ({100 * (1 - last / first):.0f}% lower)",
        f"  final train loss   {s['final_train_loss']:.4f}",
    ]
    for key, value in s["final"].items():
        if key != "eval.loss":
            lines.append(f"  {key.removeprefix('eval.').replace('_', ' '):18} {_format_metric(key, value)}")
    lines += [
        f"  time               {format_duration(s['wall_seconds'])} wall, "
        f"{format_duration(s['train_seconds_this_allocation'])} training",
        f"  run directory      {run.path}",
        f"  checkpoints        {run.checkpoints}",
        f"  TensorBoard        tensorboard --logdir {run.tensorboard}",
        f"  loss curve         {s['loss_plot']}",
    ]
    return "\n".join(lines)
