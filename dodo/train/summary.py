"""End-of-run summary: summary.json, a loss-curve PNG and the text a researcher reads first."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from dodo.config.schema import JobConfig
from dodo.eval.captioning import CaptionResult
from dodo.rundir import RunDir, write_json_atomic
from dodo.train.metrics import format_duration, read_metrics


def plot_losses(run: RunDir) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run.metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train.loss", "train caption loss"), ("eval.loss", "held-out caption loss")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval.loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
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


def write_summary(run: RunDir, cfg: JobConfig, initial_eval: float, final_eval: float,
                  captions: Sequence[CaptionResult], accuracy: float, train_seconds: float,
                  world_size: int, trainable: int, total_params: int) -> dict:
    rows = read_metrics(run.metrics)
    train_losses = [r["train.loss"] for r in rows if "train.loss" in r]
    created = run.status().get("created", None)
    summary = {
        "name": cfg.name,
        "steps": cfg.train.steps,
        "world_size": world_size,
        "trainable_parameters": trainable,
        "total_parameters": total_params,
        "initial_eval_loss": initial_eval,
        "final_eval_loss": final_eval,
        "eval_loss_ratio": final_eval / initial_eval,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "caption_accuracy": accuracy,
        "caption_samples": len(captions),
        "train_seconds_this_allocation": train_seconds,
        "wall_seconds": time.time() - created if created else train_seconds,
        "loss_plot": str(plot_losses(run)),
    }
    write_json_atomic(run.summary_file, summary)
    print(render_summary(run, summary, captions), flush=True)
    return summary


def render_summary(run: RunDir, s: dict, captions: Sequence[CaptionResult], show: int = 8) -> str:
    lines = [f"greedy captions on held-out images ({sum(c.correct for c in captions)}/{len(captions)} "
             "name the right colour and shape):"]
    for c in captions[:show]:
        lines.append(f"  {'ok  ' if c.correct else 'MISS'} {c.key}: {c.predicted!r:40} (true: {c.target!r})")
    lines += [
        "",
        f"summary of {s['name']}",
        f"  steps              {s['steps']} on {s['world_size']} ranks",
        f"  parameters         {s['trainable_parameters']:,} trainable of {s['total_parameters']:,}",
        f"  held-out loss      {s['initial_eval_loss']:.4f} -> {s['final_eval_loss']:.4f} "
        f"({100 * (1 - s['eval_loss_ratio']):.0f}% lower)",
        f"  final train loss   {s['final_train_loss']:.4f}",
        f"  caption accuracy   {100 * s['caption_accuracy']:.1f}% (colour and shape right)",
        f"  time               {format_duration(s['wall_seconds'])} wall, "
        f"{format_duration(s['train_seconds_this_allocation'])} training",
        f"  run directory      {run.path}",
        f"  checkpoints        {run.checkpoints}",
        f"  TensorBoard        tensorboard --logdir {run.tensorboard}",
        f"  loss curve         {s['loss_plot']}",
    ]
    return "\n".join(lines)
