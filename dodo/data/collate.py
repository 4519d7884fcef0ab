"""Batching: a list of Samples -> images + right-padded caption ids.

The collator appends one EOS to every caption and right-pads with the pad id (= EOS for
GPT-2-style tokenizers, so the padding is told apart by ``attention_mask``, never by id).
The model builds its labels from this: caption tokens and the first EOS are targets,
positions with ``attention_mask == 0`` are ignored.

Two image outputs:

- ``output="float32"`` (default; evaluation code and anything that feeds a model directly):
  ``(B, 3, H, W)`` float32, scaled to [0, 1] and normalised with ``image_mean`` / ``image_std``.
- ``output="uint8"`` (the training loop): ``(B, 3, H, W)`` uint8 (channels-last in memory: the
  stacked ``(B, H, W, 3)`` images, permuted as a view), 4x fewer bytes through the
  DataLoader's queues and the host-to-device copy; ``dodo.data.device.to_device`` converts and
  normalises on the device with the same mean / std (the twin of :meth:`images`, tested equal).

Unimodal caches: an image-only cache's samples have caption "" (its ids are the EOS alone); a
text-only cache's have image None, and a batch of them has ``images`` None (the MLM pretext
stage reads only the ids; ``to_device`` drops non-tensors).

Captions: a Sample carrying pre-tokenised ids (``Sample.tokens``, from ``dodo data cache
--tokenizer``) is used as is when the cache's tokenizer is the run's (see :func:`for_training`);
otherwise the caption text is tokenised here.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np
import torch

from dodo.data.sample import Sample

log = logging.getLogger("dodo.data")
OUTPUTS = ("float32", "uint8")


class CaptionCollator:
    """Callable for ``DataLoader(collate_fn=...)``. Picklable, so it works with workers."""

    def __init__(self, tokenizer: Any, max_tokens: int,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 output: str = "float32", use_stored_tokens: bool = False) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1 (room for the EOS token)")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs eos and pad tokens; load it with "
                             "dodo.data.tokenizer.load_tokenizer, which sets them")
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(f"image_mean={tuple(image_mean)} and image_std={tuple(image_std)} "
                             "must each have 3 values, with std > 0")
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} must be one of {OUTPUTS}")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.output = output
        self.use_stored_tokens = use_stored_tokens
        self._tokens_checked = False
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * self.std)  # (x / 255 - mean) / std = x * scale + shift
        self.shift = -self.mean / self.std

    def with_output(self, output: str, use_stored_tokens: Optional[bool] = None) -> "CaptionCollator":
        """A copy with another image output (and stored-token use); this one is unchanged."""
        return CaptionCollator(self.tokenizer, self.max_tokens, self.image_mean, self.image_std, output,
                               self.use_stored_tokens if use_stored_tokens is None else use_stored_tokens)

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
        if any(s.image is None for s in samples):
            raise ValueError("a batch mixes text-only samples (image None) with images; "
                             "train on one kind of cache at a time")
        shapes = {s.image.shape for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"images in one batch must share a shape, got {sorted(shapes)}")
        return torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)

    def token_ids(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (input_ids, attention_mask), both (B, T) long, T <= max_tokens."""
        encoded = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        return self.pad(encoded)

    def pad(self, encoded: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token id lists (no special tokens) -> (input_ids, attention_mask), both (B, T) long."""
        # Truncate before appending EOS so every row ends its caption with exactly one EOS.
        rows = [list(ids[: self.max_tokens - 1]) + [self.eos_id] for ids in encoded]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, T)
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, : len(row)] = 1
        return input_ids, attention_mask

    def caption_ids(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored token ids when every sample has them (and they are trusted), else tokenise."""
        stored = [getattr(s, "tokens", None) for s in samples]
        if self.use_stored_tokens and all(t is not None for t in stored):
            if not self._tokens_checked:
                self._check_stored(samples, stored)
            if self.use_stored_tokens:
                return self.pad([np.asarray(t).tolist() for t in stored])
        return self.token_ids([s.caption for s in samples])

    def _check_stored(self, samples: Sequence[Sample], stored: list) -> None:
        """Once per process: the first batch's stored ids must be what this tokenizer makes of the
        same captions. A cache tokenised by another tokenizer (or an older vocabulary) would
        otherwise train on wrong ids silently; on a mismatch, warn once and tokenise from text."""
        self._tokens_checked = True
        fresh = self.tokenizer([s.caption for s in samples], add_special_tokens=False)["input_ids"]
        for s, old, new in zip(samples, stored, fresh):
            if list(np.asarray(old).tolist()) != list(new):
                log.warning("dodo: the cache's pre-tokenised captions differ from this run's tokenizer "
                            "(sample %s); tokenising captions from their text instead (slower): rebuild "
                            "the cache with `dodo data cache --tokenizer` set to the run's tokenizer",
                            s.key)
                self.use_stored_tokens = False
                return

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        if len(samples) == 0:
            raise ValueError("cannot collate an empty batch")
        captions = [s.caption for s in samples]
        input_ids, attention_mask = self.caption_ids(samples)
        # uint8: the (B, 3, H, W) channels-last view of the stacked images: one memcpy per image
        # (np.stack); the transposing copy happens on the device, fused with the float
        # conversion (a host-side transposing copy cost ~4x the stack: docs/benchmarks.md).
        if all(s.image is None for s in samples):  # a text-only cache (MLM pretext): no images
            images = None
        else:
            images = self.pixels(samples) if self.output == "uint8" else self.images(samples)
        out = {
            # (B, 3, H, W) float32 normalised, or uint8 (to_device normalises); None for texts
            "images": images,
            "input_ids": input_ids,  # (B, T) long
            "attention_mask": attention_mask,  # (B, T) long
            "captions": captions,
            "keys": [s.key for s in samples],
        }
        ids = [getattr(s, "image_id", -1) for s in samples]
        if min(ids) >= 0:  # captions of one image are each other's positives (contrastive losses)
            out["image_ids"] = torch.tensor(ids, dtype=torch.long)  # (B,)
        return out


def tokenizer_matches(recorded: dict, tokenizer: Any) -> tuple[bool, str]:
    """Whether a cache's recorded tokenizer (manifest ``tokenizer`` field: name_or_path,
    vocab_size, sha256) can be the run's. Only facts both sides have are compared; the collator
    still checks the first batch's ids against fresh tokenisation (the decisive test)."""
    if not recorded:
        return False, "the cache stores no tokens"
    vocab = recorded.get("vocab_size")
    if vocab is not None and int(vocab) != len(tokenizer):
        return False, f"the cache's tokenizer has {vocab} tokens, the run's {len(tokenizer)}"
    return True, ""


def for_training(collate: Any, dataset: Any = None) -> Any:
    """The collate function the training loop uses: a CaptionCollator switched to uint8 images
    (``dodo.data.device.to_device`` normalises them) and to the cache's stored token ids when
    its manifest records a compatible tokenizer. Any other collate function is returned as is."""
    if type(collate) is not CaptionCollator:  # a subclass may add outputs with_output would drop
        return collate
    manifest = getattr(dataset, "manifest", None)
    recorded = getattr(manifest, "tokenizer", None) or {}
    use, why = tokenizer_matches(recorded, collate.tokenizer) if recorded else (False, "")
    if recorded and not use:
        log.warning("dodo: not using the cache's pre-tokenised captions: %s; tokenising from text", why)
    return collate.with_output("uint8", use_stored_tokens=use)
