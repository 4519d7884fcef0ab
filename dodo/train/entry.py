"""`dodo run RUN_DIR`: the per-rank entry point. Parse, build, train, close."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from dodo.cluster.env import discover
from dodo.config.resume import accept_overrides, load_run_config, refuse_overrides
from dodo.rundir import RunDir


def _process_start() -> float:
    """Unix time this process started (Linux /proc; elsewhere: now)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(l.split()[1]) for l in open("/proc/stat") if l.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def run_rank(run_dir: str) -> int:
    # A scheduler's warning (USR2) or preemption (TERM) may come while torch and DeepSpeed are
    # still importing, before the Trainer's own handlers exist: keep it instead of dying of it.
    early: list[int] = []
    # (INT and HUP too: the local launcher forwards what it receives, and may do so this early.)
    for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: early.append(signum))
    run = RunDir.open(run_dir)
    cfg = load_run_config(run)  # config.yaml + the overrides of this resume, if any
    env = discover()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    # Start-up stages as unix times, read by bench/startup.py: process start, config read, imports.
    log = logging.getLogger("dodo.train")
    log.info("startup: process %.3f", _process_start())
    log.info("startup: config %.3f", time.time())
    from dodo.train.loop import Trainer  # heavy imports (torch, DeepSpeed) after the cheap checks
    log.info("startup: imports %.3f", time.time())

    from dodo.train.checkpoint import CheckpointError

    try:
        trainer = Trainer(cfg, run, env)  # loads the checkpoint: a resume is accepted or refused here
    except CheckpointError as err:
        if env.rank == 0:  # recorded; config.yaml stays as it was (dodo/config/resume.py)
            refuse_overrides(run, str(err))
        raise
    if env.rank == 0:
        accept_overrides(run)
    if early and trainer.stop.reason is None:
        trainer.stop.reason = f"{signal.Signals(early[0]).name} received while starting"
    try:
        return trainer.fit()
    finally:
        trainer.close()
