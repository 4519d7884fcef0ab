"""Image captioning with a MAGMA-style prefix LM, scored by held-out loss and greedy captions."""

from __future__ import annotations

from torch import nn

from dodo.config.schema import JobConfig
from dodo.data import build_datasets
from dodo.data.collate import CaptionCollator
from dodo.data.tokenizer import load_tokenizer
from dodo.eval.captioning import caption_loss, greedy_captions
from dodo.models import build_model
from dodo.tasks import Task


class CaptioningTask(Task):
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        self.model = build_model(cfg.model, vocab_size=len(self.tokenizer),
                                 eos_token_id=self.tokenizer.eos_token_id)
        d = cfg.data
        self.train_set, self.eval_set = build_datasets(d)
        self.collate = CaptionCollator(self.tokenizer, d.max_caption_tokens)

    def evaluate(self, model: nn.Module, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
        return {"eval.loss": caption_loss(model, self.eval_set, self.collate, batch_size, rank, world_size)}

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        captions = greedy_captions(model, self.eval_set, self.collate, self.tokenizer,
                                   self.cfg.train.caption_samples, self.cfg.data.max_caption_tokens)
        right = sum(c.correct for c in captions)
        accuracy = right / max(1, len(captions))
        lines = [f"greedy captions on held-out images ({right}/{len(captions)} name the right colour and shape):"]
        lines += [f"  {'ok  ' if c.correct else 'MISS'} {c.key}: {c.predicted!r:40} (true: {c.target!r})"
                  for c in captions[:8]]
        return {"eval.caption_accuracy": accuracy}, lines
