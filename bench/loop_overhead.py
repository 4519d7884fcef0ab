"""dodo's training loop against the bare DeepSpeed loop, same model, engine and data.

One process, world size 1, gloo on CPU, one thread. The Trainer is built as `dodo run` builds
it; then, in alternating order over several rounds (paired: both loops see the same load):

  dodo:  Trainer.fit() for --steps steps (sampler, uint8 collate + device normalise, logging,
         metrics, stop-flag agreement, ...); periodic eval and checkpoints pushed past the end
  bare:  for batch in DataLoader(task.train_set, batch_size, collate_fn=task.collate):
             loss = engine(**{k: v.to(device)}); engine.backward(loss); engine.step()

Each loop iteration's CPU time (time.process_time between the starts of consecutive optimizer
steps, so data loading and the loop's own bookkeeping are inside) and wall time are recorded;
the first 3 of each run are warm-up and dropped. The table gives per-step medians and the
dodo / bare ratio per round (median [min-max]). Target: <= 1.05 (docs/benchmarks.md).

    python bench/loop_overhead.py                      # demo model (jobs/demo.yaml), 6 rounds x 30 steps
    python bench/loop_overhead.py --rounds 2 --steps 10 -- model.lm.d_model=64
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default=os.path.join(REPO, "jobs/demo.yaml"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    import torch

    from dodo.cluster.env import discover
    from dodo.config.loader import dump_config, load_job
    from dodo.rundir import RunDir
    from dodo.train.loop import Trainer

    torch.set_num_threads(1)
    big = 10 ** 9
    runs = tempfile.mkdtemp(prefix="dodo-loop-bench-")
    os.chdir(runs)  # relative data caches (data_cache/...) are built here, not in the repo
    cfg = load_job(args.job, [*args.overrides, "cluster.backend=local", "cluster.nodes=1", "cluster.tasks_per_node=1",
                              "cluster.threads_per_task=1", f"runs_dir={runs}", f"train.steps={args.steps}",
                              f"train.eval_every={big}", f"train.save_every={big}", "train.log_every=10"])
    run = RunDir.create(cfg.runs_dir, cfg.name, dump_config(cfg))
    trainer = Trainer(cfg, run, discover())
    # Evaluation and the final report are not part of a step: off (only steps are timed).
    trainer.history["initial_eval"] = {"eval.loss": 1.0}
    trainer._evaluate = lambda: {"eval.loss": 1.0}
    trainer.task.final_report = lambda model: ({}, [])
    engine, task, device = trainer.engine, trainer.task, trainer.device

    marks: list[tuple[float, float]] = []
    real_step = trainer._train_step

    def timed_step(batch):
        marks.append((time.process_time(), time.perf_counter()))
        return real_step(batch)

    trainer._train_step = timed_step

    def per_step() -> tuple[list[float], list[float]]:
        m = marks[3:]
        return ([b[0] - a[0] for a, b in zip(m, m[1:])], [b[1] - a[1] for a, b in zip(m, m[1:])])

    def run_dodo() -> tuple[list[float], list[float]]:
        marks.clear()
        trainer.step = 0
        trainer.stop.reason = None
        trainer.fit()  # intervals between step starts: the last step (then its save) is not counted
        return per_step()

    def run_bare() -> tuple[list[float], list[float]]:
        marks.clear()
        loader = torch.utils.data.DataLoader(task.train_set, batch_size=cfg.train.micro_batch, shuffle=True,
                                             collate_fn=task.collate, drop_last=True)
        engine.train()
        for i, batch in enumerate(loader):
            if i == args.steps:
                break
            marks.append((time.process_time(), time.perf_counter()))
            loss = engine(**{k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
            engine.backward(loss)
            engine.step()
            loss.item()  # as dodo's loop reads the loss of every step
        return per_step()

    rows = []
    for r in range(args.rounds):
        order = [("dodo", run_dodo), ("bare", run_bare)][:: 1 if r % 2 == 0 else -1]
        got = {name: fn() for name, fn in order}
        cpu = {k: statistics.median(v[0]) for k, v in got.items()}
        wall = {k: statistics.median(v[1]) for k, v in got.items()}
        rows.append((cpu, wall))
        print(f"round {r}: dodo {cpu['dodo'] * 1e3:.1f} ms CPU / {wall['dodo'] * 1e3:.1f} ms wall per step, "
              f"bare {cpu['bare'] * 1e3:.1f} / {wall['bare'] * 1e3:.1f}; load {os.getloadavg()[0]:.1f}",
              file=sys.stderr, flush=True)
    trainer.close()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()

    def fmt(xs: list[float], scale: float = 1e3, unit: str = " ms") -> str:
        return f"{statistics.median(xs) * scale:.2f}{unit} [{min(xs) * scale:.2f}-{max(xs) * scale:.2f}]"

    ratio_cpu = [c["dodo"] / c["bare"] for c, _ in rows]
    ratio_wall = [w["dodo"] / w["bare"] for _, w in rows]
    print(f"\n{cfg.name} ({' '.join(args.overrides) or 'as in the job file'}), micro_batch {cfg.train.micro_batch}, "
          f"1 rank, 1 thread, {args.rounds} paired rounds x {args.steps} steps; commit {commit}, "
          f"{time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| per step | dodo loop | bare DeepSpeed loop | dodo / bare |\n|---|---:|---:|---:|")
    print(f"| CPU time | {fmt([c['dodo'] for c, _ in rows])} | {fmt([c['bare'] for c, _ in rows])} | "
          f"{fmt(ratio_cpu, 1, 'x')} |")
    print(f"| wall time | {fmt([w['dodo'] for _, w in rows])} | {fmt([w['bare'] for _, w in rows])} | "
          f"{fmt(ratio_wall, 1, 'x')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
