"""Batching: a list of Samples -> normalised image tensor + right-padded caption ids.

The collator appends one EOS to every caption and right-pads with the pad id (= EOS for
GPT-2-style tokenizers, so the padding is told apart by ``attention_mask``, never by id).
The model builds its labels from this: caption tokens and the first EOS are targets,
positions with ``attention_mask == 0`` are ignored.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from dodo.data.synthetic import Sample


class CaptionCollator:
    """Callable for ``DataLoader(collate_fn=...)``. Picklable, so it works with workers."""

    def __init__(self, tokenizer: Any, max_tokens: int,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1 (room for the EOS token)")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs eos and pad tokens; load it with "
                             "dodo.data.tokenizer.load_tokenizer, which sets them")
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(f"image_mean={tuple(image_mean)} and image_std={tuple(image_std)} "
                             "must each have 3 values, with std > 0")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * self.std)  # (x / 255 - mean) / std = x * scale + shift
        self.shift = -self.mean / self.std

    def images(self, samples: Sequence[Sample]) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, scaled to [0, 1] then normalised.

        One pass converts and transposes into a preallocated contiguous tensor, then one
        in-place multiply-add applies (x / 255 - mean) / std: about 3x faster than the
        permute-float-divide-subtract-divide chain, which made 4 temporaries of the batch.
        """
        pixels = self.pixels(samples)  # (B, 3, H, W) uint8, a strided view
        out = torch.empty(pixels.shape, dtype=torch.float32)
        out.copy_(pixels)
        return out.mul_(self.scale).add_(self.shift)

    def pixels(self, samples: Sequence[Sample]) -> torch.Tensor:
        """(B, 3, H, W) uint8 view of the stacked (B, H, W, 3) images, not normalised."""
        shapes = {s.image.shape for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"images in one batch must share a shape, got {sorted(shapes)}")
        return torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)

    def token_ids(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (input_ids, attention_mask), both (B, T) long, T <= max_tokens."""
        encoded = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        # Truncate before appending EOS so every row ends its caption with exactly one EOS.
        rows = [ids[: self.max_tokens - 1] + [self.eos_id] for ids in encoded]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, T)
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, : len(row)] = 1
        return input_ids, attention_mask

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        if len(samples) == 0:
            raise ValueError("cannot collate an empty batch")
        captions = [s.caption for s in samples]
        input_ids, attention_mask = self.token_ids(captions)
        return {
            "images": self.images(samples),  # (B, 3, H, W) float32
            "input_ids": input_ids,  # (B, T) long
            "attention_mask": attention_mask,  # (B, T) long
            "captions": captions,
            "keys": [s.key for s in samples],
        }
