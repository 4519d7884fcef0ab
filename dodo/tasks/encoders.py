"""Helpers the family tasks share to expose their encoders to the evaluation suites.

INTERFACES.md section 4: a contrastive family's task provides
``encode_images(model, images) -> (B, D)`` and ``encode_texts(model, texts) -> (B, D)``, a
captioning family's ``generate(model, images, prompt=None, **decoding) -> list[str]``.
Images arrive as the datasets hold them, uint8 (B, H, W, 3), or already as the model's
normalised float (B, 3, H, W).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def to_model_images(images: Any, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, H, W, 3) (array, tensor or list of images) -> float32 (B, 3, H, W), (x / 255 - mean) / std; float (B, 3, H, W)
    is taken as already normalised (the collator's output)."""
    if isinstance(images, (list, tuple)):  # a list of (H, W, 3) images
        images = np.stack([np.asarray(i) for i in images])
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (B, H, W, 3), got {tuple(x.shape)}")
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        return (x.permute(0, 3, 1, 2).float() / 255.0 - m) / s
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"float images must be normalised (B, 3, H, W), got {tuple(x.shape)}")
    return x.float()


@torch.no_grad()
def image_features(model: Any, images: Any, collate: Any) -> torch.Tensor:
    """The suites' ``encode_images`` of a task whose model has ``encode_image(pixels)``: uint8
    (B, H, W, 3) or normalised float (B, 3, H, W), normalised with the collator's mean / std ->
    (B, D) float on the CPU (unit norm when the model's features are)."""
    device = next(model.parameters()).device
    pixels = to_model_images(images, collate.image_mean, collate.image_std)
    return model.encode_image(pixels.to(device)).float().cpu()
