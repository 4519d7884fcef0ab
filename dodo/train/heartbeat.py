"""Per-rank heartbeat and on-demand stack dumps, for the launcher's watchdog (dodo/cluster/watchdog.py).

Each rank rewrites job/heartbeat/rank_<r>.json ({rank, host, pid, step, phase, time}) atomically
whenever its phase changes and at most every `interval` seconds within a phase; the watchdog
compares its age with the allowance of the phase (cluster.hang_timeout_s). A rank stuck in a
collective or a kernel stops beating: that is the point.

faulthandler, registered on SIGUSR1, writes every thread's Python stack to job/stacks/rank_<r>.txt
when the watchdog asks; it runs in C inside the signal handler, so it works while the main thread
is blocked in a gloo/NCCL call (a SIGSTOPped rank needs SIGCONT first; the watchdog sends both).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import time
from pathlib import Path

from dodo.rundir import RunDir, write_atomic

PHASES = ("startup", "step", "eval", "checkpoint", "done")
DUMP_SIGNAL = signal.SIGUSR1  # the scheduler sends USR2 (stop), never USR1 (CLUSTERS.md)


def heartbeat_dir(run: RunDir) -> Path:
    return run.job / "heartbeat"


def stacks_dir(run: RunDir) -> Path:
    return run.job / "stacks"


class Heartbeat:
    def __init__(self, run: RunDir, rank: int, interval: float = 5.0):
        self.path = heartbeat_dir(run) / f"rank_{rank}.json"
        self.rank, self.interval = rank, interval
        # The scheduler's name for the node (what --exclude takes; a virtual node's hostname differs).
        self.host, self.pid = os.environ.get("SLURMD_NODENAME") or socket.gethostname(), os.getpid()
        self.phase, self.step, self.last = "", 0, 0.0
        stacks = stacks_dir(run)
        stacks.mkdir(parents=True, exist_ok=True)
        # Kept open for the life of the rank: faulthandler writes to the descriptor from a handler.
        self._stacks = open(stacks / f"rank_{rank}.txt", "a")
        faulthandler.register(DUMP_SIGNAL, file=self._stacks, all_threads=True, chain=False)

    def beat(self, phase: str, step: int | None = None, force: bool = False) -> None:
        now = time.time()
        if step is not None:
            self.step = step
        if not force and phase == self.phase and now - self.last < self.interval:
            return
        self.phase, self.last = phase, now
        write_atomic(self.path, json.dumps({"rank": self.rank, "host": self.host, "pid": self.pid,
                                            "step": self.step, "phase": phase, "time": now}))

    def close(self) -> None:
        self.beat("done", force=True)
        faulthandler.unregister(DUMP_SIGNAL)
        self._stacks.close()
