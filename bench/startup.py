"""Submit-to-first-step and resume-to-first-step, broken into the stages the ranks log.

Each rank logs ``startup: <stage> <unix time>`` (dodo/train/entry.py, dodo/train/loop.py):

    process           the rank's Python process started (launcher + interpreter before this)
    config            run config read, rendezvous discovered
    imports           torch, transformers, DeepSpeed, dodo's training modules imported
    process group     deepspeed.init_distributed (gloo / nccl rendezvous)
    model and data    the task: model built (frozen weights), datasets opened (caches verified)
    deepspeed engine  deepspeed.initialize: optimizer, ZeRO partitioning
    checkpoint        the latest checkpoint loaded (resume), else nothing
    first step        the first optimizer step done (loader start + forward + backward + step)

The bench runs `dodo submit JOB` (local backend, 2 ranks) with train.steps_per_allocation set so
the run stops after a few steps, then `dodo submit RUN_DIR` to resume it; the clock starts when
the command is started. Several rounds; median [min-max] per stage, rank 0's log (the slowest
rank gates the first step anyway).

    python bench/startup.py                      # demo job, tiny sizes, 3 rounds
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dodo.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
STAGES = ["process", "config", "imports", "process group", "model and data", "deepspeed engine",
          "checkpoint", "first step"]
TINY = ["model.lm.d_model=32", "model.lm.n_head=2", "model.lm.n_positions=40", "model.image_encoder.hidden=32",
        "model.image_encoder.n_layer=1", "data.num_train=512", "data.num_eval=32", "train.micro_batch=8",
        "train.log_every=1", "train.eval_every=1000", "train.caption_samples=4", "train.warmup_steps=2"]


def stages(log: Path, after: float) -> dict[str, float]:
    """Stage -> unix time, from the first start-up in a rank log that began after `after`."""
    found: dict[str, float] = {}
    for line in log.read_text().splitlines():
        m = re.search(r"startup: (.+) (\d+\.\d+)$", line)
        if m and float(m.group(2)) >= after:
            if m.group(1) == "process" and found:
                break  # the next start-up (a later submit of the same run)
            found[m.group(1)] = float(m.group(2))
    return found


def dodo(*args: str, cwd: Path) -> float:
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    proc = subprocess.run([sys.executable, "-m", "dodo", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"dodo {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default=str(REPO / "jobs/demo.yaml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("overrides", nargs="*", default=TINY)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dodo-startup-bench-"))
    rows: dict[str, dict[str, list[float]]] = {"submit": {}, "resume": {}}
    for r in range(args.rounds):
        runs = work / f"runs{r}"
        t0 = dodo("submit", args.job, *args.overrides, "train.steps=4", "train.steps_per_allocation=2",
                  "train.save_every=2", f"runs_dir={runs}", cwd=work)
        (run,) = [d for d in (runs / "demo").iterdir() if not d.name.startswith(".")]
        t1 = dodo("submit", str(run), cwd=work)
        for what, start in (("submit", t0), ("resume", t1)):
            s = stages(RunDir.open(run).rank_log(0), start)
            prev = start
            for stage in STAGES:
                if stage in s:
                    rows[what].setdefault(stage, []).append(s[stage] - prev)
                    prev = s[stage]
            rows[what].setdefault("total", []).append(s["first step"] - start)
        print(f"round {r}: submit {rows['submit']['total'][-1]:.1f} s, resume {rows['resume']['total'][-1]:.1f} s "
              f"to the first step; load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    print(f"\n{Path(args.job).name} with tiny sizes, 2 ranks (local backend, gloo), {args.rounds} rounds: median "
          f"[min-max] seconds; commit {commit}, {time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f}\n")
    print("| stage (time since the previous one) | submit | resume |\n|---|---:|---:|")
    for stage in ["process"] + STAGES[1:] + ["total"]:
        cells = []
        for what in ("submit", "resume"):
            xs = rows[what].get(stage)
            cells.append(f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]" if xs else "-")
        label = "command start -> rank process start" if stage == "process" else stage
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
