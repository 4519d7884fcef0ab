"""Stop requests: scheduler warnings (USR2), preemption / kill (TERM), Ctrl-C (INT), hang-up (HUP).

A handler only sets a flag; the loop checks it at step boundaries, agrees across ranks
(some ranks may not have received the signal), checkpoints and exits.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = {signal.SIGUSR2: "warning signal (USR2)", signal.SIGTERM: "terminate signal (TERM)",
                signal.SIGINT: "interrupt (INT)", signal.SIGHUP: "hang-up signal (HUP)"}


class StopFlag:
    def __init__(self) -> None:
        self.reason: str | None = None

    def install(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.reason = STOP_SIGNALS.get(signal.Signals(signum), f"signal {signum}")

    def agreed(self) -> bool:
        """True on every rank if any rank was asked to stop."""
        flag = torch.tensor([1 if self.reason else 0])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.reason is None:
            self.reason = "stop requested on another rank"
        return bool(flag.item())
