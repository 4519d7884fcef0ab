"""The device side of the input pipeline: move a collated batch to the device, and there turn
its uint8 images into normalised floats.

The DataLoader hands over ``(B, 3, H, W)`` uint8 images (``CaptionCollator(output="uint8")``):
a quarter of the float32 bytes through worker queues, pinned memory and the host-to-device
copy, and no per-pixel float work on the CPU, which capped every loader near 1,000 samples/s
on this project's CPUs (docs/benchmarks.md). The conversion is one fused multiply-add on the
device: ``x * (1 / (255 std)) - mean / std``, the same formula and float32 rounding as
``CaptionCollator.images`` (its tested twin), so the model sees the same values.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch


class DeviceBatch:
    """Callable: a batch dict's tensors -> on ``device``; uint8 ``images`` normalised there.

    ``mean`` / ``std`` are per channel, as the collator's; ``dtype`` is the float type the model
    wants its images in (float32 keeps results identical to the CPU path; a bf16 / fp16 model may
    ask for its own type, halving the activation memory of the first layer). Copies are
    ``non_blocking`` from pinned memory on CUDA (the DataLoader pins with ``pin_memory=True``).
    """

    def __init__(self, device: torch.device | str, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        # Computed on the CPU in float32 exactly as the collator does, then moved: same constants.
        self.scale = (1.0 / (255.0 * std_t)).to(self.device)  # (1, 3, 1, 1)
        self.shift = (-mean_t / std_t).to(self.device)  # (1, 3, 1, 1)
        self.non_blocking = self.device.type == "cuda"

    @classmethod
    def for_collate(cls, collate: Any, device: torch.device | str,
                    dtype: torch.dtype = torch.float32) -> "DeviceBatch":
        """Mean / std from the collate function (``CaptionCollator.image_mean`` / ``image_std``),
        the defaults (0.5, 0.5, 0.5) when it has none."""
        return cls(device, getattr(collate, "image_mean", (0.5,) * 3),
                   getattr(collate, "image_std", (0.5,) * 3), dtype)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 on the device -> (B, 3, H, W) ``dtype``, normalised."""
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        out.copy_(images)
        out.mul_(self.scale).add_(self.shift)
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                continue  # captions, keys: host-side only
            value = value.to(self.device, non_blocking=self.non_blocking)
            if key == "images" and value.dtype == torch.uint8:
                value = self.normalise(value)
            out[key] = value
        return out


def to_device(batch: Mapping[str, Any], device: torch.device | str,
              mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One-off form of :class:`DeviceBatch` (builds the constants each call)."""
    return DeviceBatch(device, mean, std, dtype)(batch)


def loader_options(device: torch.device, num_workers: int, prefetch_factor: Optional[int]) -> dict:
    """DataLoader keyword arguments for the input pipeline: pinned memory on CUDA (so the
    copy can be non_blocking), persistent workers (no fork and re-open of shards per epoch or
    loader), and ``prefetch_factor`` batches queued per worker (only valid with workers)."""
    opts: dict[str, Any] = {"pin_memory": device.type == "cuda"}
    if num_workers > 0:
        opts["persistent_workers"] = True
        if prefetch_factor:
            opts["prefetch_factor"] = prefetch_factor
    return opts
