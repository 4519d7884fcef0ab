"""`dodo run RUN_DIR`: the per-rank entry point. Parse, build, train, close."""

from __future__ import annotations

import logging
import signal
import sys

from dodo.cluster.env import discover
from dodo.config.resume import accept_overrides, load_run_config, refuse_overrides
from dodo.rundir import RunDir


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
    from dodo.train.loop import Trainer  # heavy imports (torch, DeepSpeed) after the cheap checks

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
