"""Which implementation an op runs: the Triton kernel or the plain PyTorch reference.

``DODO_KERNELS`` (read at every call, so tests and benchmarks can switch it):
  auto       (default) Triton when the tensors are on CUDA, Triton imports, the dtype is
             supported by the device (bf16 needs sm_80+; V100 gets fp16/fp32) and the op
             supports the shape; the reference otherwise (CPU, POWER9, no Triton).
  triton     always Triton; an error says why when it cannot run. On CPU it needs
             ``TRITON_INTERPRET=1`` (set before the first import of the kernels), which is
             how the tests check the kernels on machines without a GPU.
  reference  always the PyTorch reference.

``DODO_KERNELS_POISON=1`` makes every launcher fill its outputs with NaN (float) or -1
(int) before the kernel runs, so an element a kernel forgets to write cannot pass a test.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

ENV = "DODO_KERNELS"
POISON_ENV = "DODO_KERNELS_POISON"
_MODES = ("auto", "triton", "reference")


class KernelUnavailable(RuntimeError):
    """DODO_KERNELS=triton was asked for, but the Triton kernel cannot run here."""


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"{ENV}={value!r} is not one of {', '.join(_MODES)}; "
                         f"unset it or set it to auto, triton or reference")
    return value


_HAS_TRITON = importlib.util.find_spec("triton") is not None  # a constant: torch.compile folds it


def triton_available() -> bool:
    return _HAS_TRITON


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _why_not(t: torch.Tensor, shape_ok: bool) -> str | None:
    """None when Triton can run on ``t``; otherwise the reason, for error messages."""
    if not triton_available():
        return "the triton package is not installed (pip install 'triton>=3.5,<4'; none exists for ppc64le)"
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {t.dtype} is not supported (float16, bfloat16, float32)"
    if t.device.type == "cuda":
        if t.dtype == torch.bfloat16 and _capability(t.device.index or 0)[0] < 8:
            return "bfloat16 needs compute capability 8.0+ (use float16 on V100)"
    elif not (t.device.type == "cpu" and interpreting()):
        return f"tensors on {t.device.type} need CUDA, or TRITON_INTERPRET=1 on CPU"
    if not shape_ok:
        return "the op does not support this shape (see docs/kernels.md)"
    return None


def use_triton(t: torch.Tensor, shape_ok: bool = True, op: str = "op") -> bool:
    """Decide for one call; ``t`` is the op's main activation tensor."""
    m = mode()
    if m == "reference":
        return False
    why = _why_not(t, shape_ok)
    if m == "triton":
        if why is not None:
            raise KernelUnavailable(f"{ENV}=triton but {op} cannot run its Triton kernel: {why}; "
                                    f"set {ENV}=auto to fall back to the PyTorch reference")
        return True
    # auto: the interpreter is for tests, never chosen implicitly
    return why is None and t.device.type == "cuda"


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer; poisoned when DODO_KERNELS_POISON=1 (tests)."""
    if os.environ.get(POISON_ENV, "0") in ("", "0"):
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def next_pow2(n: int, floor: int = 16) -> int:
    """Padded size of a small dimension held in one block (tl.dot needs >= 16)."""
    return max(floor, 1 << max(0, n - 1).bit_length())
