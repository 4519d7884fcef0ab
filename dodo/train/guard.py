"""Divergence guard: a non-finite loss or gradient skips the optimizer update or stops the run.

The decision is taken once per optimizer step, at the gradient-accumulation boundary, after
DeepSpeed's backward has reduced the gradients and before its step applies them. Every rank
contributes a local flag and one all-reduce (MAX) makes the decision the same on all ranks: a
rank that skipped alone would fall out of step with the others' weights.

A skip goes through DeepSpeed's own overflow path (the one fp16 loss scaling uses), so the
engine's counters stay consistent: no optimizer update, gradients cleared, the LR schedule does
not advance, `engine.skipped_steps` grows. Under fp16 a non-finite *gradient* is a loss-scale
overflow and stays DeepSpeed's business; only a non-finite loss counts there.

Test hook: DODO_INJECT_NAN_AT_STEP=N makes the loss of optimizer step N (1-based) NaN, on the
rank given by DODO_INJECT_NAN_RANK (default 0), or on every rank with DODO_INJECT_NAN_RANK=all;
DODO_INJECT_NAN_STEPS=K repeats it for K consecutive steps (default 1).
"""

from __future__ import annotations

import math
import os
from typing import Iterable

import torch
import torch.distributed as dist


def injected_nan(step: int, rank: int) -> bool:
    """Whether the test hook asks for a NaN loss at optimizer step `step` (1-based) on `rank`."""
    at = os.environ.get("DODO_INJECT_NAN_AT_STEP")
    if not at:
        return False
    first, count = int(at), int(os.environ.get("DODO_INJECT_NAN_STEPS", "1"))
    who = os.environ.get("DODO_INJECT_NAN_RANK", "0")
    return first <= step < first + count and (who == "all" or int(who) == rank)


def _any_nonfinite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """One device sync for all tensors (a GPU would otherwise sync once per tensor)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None and t.numel()]
    return bool(flags) and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def local_grads_nonfinite(engine) -> bool:
    """This rank's reduced gradients: p.grad (ZeRO-0/1) or ZeRO-2's partitioned averaged grads."""
    if _any_nonfinite(p.grad for p in engine.module.parameters() if p.requires_grad):
        return True
    averaged = getattr(engine.optimizer, "averaged_gradients", None) or {}
    return any(_any_nonfinite(grads or []) for grads in averaged.values())


def params_nonfinite(params: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> bool:
    """Collective: whether any rank holds a non-finite trainable tensor."""
    return agree(_any_nonfinite(params), device)


def agree(flag: bool, device: torch.device | str = "cpu") -> bool:
    """One all-reduce (MAX): True on every rank when it is True on any. `device`: the process
    group's (NCCL reduces CUDA tensors only)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def skip_update(engine) -> None:
    """Call engine.step() at the boundary with the update suppressed, through the overflow path."""
    opt = engine.optimizer
    if hasattr(opt, "check_grad_overflow") and hasattr(opt, "has_overflow"):
        # DeepSpeed's ZeRO-1/2 optimizer: its step() checks has_overflow() and, when true, clears
        # the gradients and partitions and returns without updating (stage_1_and_2.py).
        saved = opt.check_grad_overflow
        opt.check_grad_overflow = True
        opt.has_overflow = lambda *args, **kwargs: True  # instance attribute, removed below
        try:
            engine.step()
        finally:
            del opt.has_overflow
            opt.check_grad_overflow = saved
        return
    # A plain torch optimizer (ZeRO-0, fp32): no-op step, and the engine reads `overflow` to skip
    # the LR schedule and count the step as skipped; it zeroes the gradients itself.
    had_overflow = "overflow" in vars(opt)
    saved_overflow = vars(opt).get("overflow")
    opt.step = lambda *args, **kwargs: None
    opt.overflow = True
    try:
        engine.step()
    finally:
        del opt.step
        if had_overflow:
            opt.overflow = saved_overflow
        else:
            del opt.overflow


class NonFiniteGuard:
    """Counts consecutive skipped steps; `check` returns 'ok', 'skip' or 'stop'."""

    def __init__(self, policy: str, max_skips: int, fp16: bool, device: torch.device | str = "cpu"):
        self.policy, self.max_skips, self.fp16, self.device = policy, max_skips, fp16, device
        self.consecutive = 0
        self.skipped: list[int] = []  # steps skipped in this allocation
        self.reason = ""

    def check(self, engine, losses: list[float], step: int) -> str:
        """Collective. `losses`: this rank's micro-batch losses of optimizer step `step`."""
        bad_loss = any(not math.isfinite(v) for v in losses)
        bad_grad = False if self.fp16 else local_grads_nonfinite(engine)
        # Two flags in one all-reduce: which of the two went wrong, for the message.
        t = torch.tensor([1.0 if bad_loss else 0.0, 1.0 if bad_grad else 0.0], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        t = t.cpu()
        if not t.any():
            self.consecutive = 0
            return "ok"
        what = " and ".join(w for w, f in (("loss", t[0]), ("gradient norm", t[1])) if f)
        self.consecutive += 1
        if self.policy == "skip" and self.consecutive <= self.max_skips:
            self.skipped.append(step)
            self.reason = f"non-finite {what} at step {step}"
            return "skip"
        self.reason = (f"non-finite {what} at step {step}" if self.policy == "stop" else
                       f"non-finite {what} at step {step}, step {self.consecutive} in a row "
                       f"(train.max_nonfinite_skips={self.max_skips})")
        return "stop"
