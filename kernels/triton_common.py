"""Launch helpers shared by the Triton launchers (imported only when a kernel is launched)."""

from __future__ import annotations

import torch
import triton.language as tl

from .dispatch import interpreting

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype):
    """Operand dtype of tl.dot: the input dtype (tensor cores), except bf16 under the
    interpreter, whose numpy emulation stores bf16 as uint16 and multiplies the bits."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL[dtype]


def precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products, as torch's default (allow_tf32=False) does.
    return "ieee" if dtype == torch.float32 else "tf32"


def n_splits(n_rows: int, n_col_blocks: int, block_rows: int, device: torch.device) -> int:
    """Row splits of a weight-gradient reduction: enough programs to fill the device."""
    if device.type != "cuda":
        return max(1, min(2, triton_cdiv(n_rows, block_rows)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (4 * sms) // max(1, n_col_blocks))
    return max(1, min(want, triton_cdiv(n_rows, block_rows), 64))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
