"""Captioning evaluation: held-out caption loss and greedy captions (the metrics against all
references are dodo/eval/caption_metrics.py; decoding strategies dodo/eval/generate.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dodo.data.collate import CaptionCollator
from dodo.eval import shapes


@torch.no_grad()
def caption_loss(model: nn.Module, dataset, collate: CaptionCollator, batch_size: int,
                 rank: int, world_size: int) -> float:
    """Mean per-token caption loss over the whole held-out set, split across ranks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, number of tokens)
    indices = list(range(rank, len(dataset), world_size))
    # Every rank runs the same number of forwards: an expert-parallel MoE model exchanges tokens
    # between ranks in each one. A rank out of samples runs a repeat of sample 0, not counted.
    per_rank = -(-len(dataset) // world_size)
    for lo in range(0, per_rank, batch_size):
        chunk = indices[lo:lo + batch_size]
        batch = collate([dataset[i] for i in (chunk or [0])])
        tokens = int(batch["attention_mask"].sum()) if chunk else 0
        loss = model(batch["images"].to(device), batch["input_ids"].to(device),
                     batch["attention_mask"].to(device))
        total += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


@dataclass
class CaptionResult:
    key: str
    target: str
    predicted: str
    correct: bool  # synthetic shapes only: colour and shape both named right (False elsewhere)


@torch.no_grad()
def greedy_captions(model: nn.Module, dataset, collate: CaptionCollator, tokenizer, count: int,
                    max_tokens: int) -> list[CaptionResult]:
    """Greedy captions for the first `count` held-out images (rank 0 only)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    results = []
    for lo in range(0, len(samples), 32):
        chunk = samples[lo:lo + 32]
        images = collate(chunk)["images"].to(device)
        for sample, ids in zip(chunk, model.generate(images, max_tokens=max_tokens)):
            predicted = tokenizer.decode(ids, skip_special_tokens=True).strip()
            # Only the shapes suite knows the generator's attributes; real data has none.
            correct = bool(sample.attrs) and shapes.caption_names_object(predicted, sample.attrs)
            results.append(CaptionResult(sample.key, sample.caption, predicted, correct))
    model.train(was_training)
    return results
