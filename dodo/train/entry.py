"""`dodo run RUN_DIR`: the per-rank entry point. Parse, build, train, close."""

from __future__ import annotations

import logging
import sys

from dodo.cluster.env import discover
from dodo.config.loader import load_job
from dodo.rundir import RunDir


def run_rank(run_dir: str) -> int:
    run = RunDir.open(run_dir)
    cfg = load_job(run.config)
    env = discover()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    from dodo.train.loop import Trainer  # heavy imports (torch, DeepSpeed) after the cheap checks

    trainer = Trainer(cfg, run, env)
    try:
        return trainer.fit()
    finally:
        trainer.close()
