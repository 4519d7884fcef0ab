"""MAGMA's task: image captioning with the prefix LM, scored by held-out loss and captions.

Tasks layer (found through ``dodo.models.magma.FAMILY.task``). For evaluation suites it
exposes ``generate(model, images, prompt=None, **decoding) -> list[str]`` (dodo/eval/generate.py:
greedy, beam, sampling, KV cache) and the prefix embedding + LM through the model
(``model.embed``, ``model.lm``, ``model.prefix``), as docs/architecture.md says.
The caption check of the final report is the synthetic shapes suite's (dodo/tasks/shapes.py);
on other data the report lists the captions without scoring them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from dodo.config.schema import JobConfig
from dodo.data import build_datasets
from dodo.data.collate import CaptionCollator
from dodo.data.tokenizer import load_tokenizer
from dodo.eval.captioning import caption_loss
from dodo.models.registry import InitState
from dodo.tasks import Task, build_family_model
from dodo.tasks.encoders import to_model_images


def build_task(cfg: JobConfig, init: InitState | None = None) -> "CaptioningTask":
    return CaptioningTask(cfg, init)


class CaptioningTask(Task):
    def __init__(self, cfg: JobConfig, init: InitState | None = None):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        self.model = build_family_model(cfg.model, self.tokenizer, init)
        d = cfg.data
        self.train_set, self.eval_set = build_datasets(d)
        self.collate = CaptionCollator(self.tokenizer, d.max_caption_tokens)

    # ---------------------------------------------------------------- hooks for eval suites

    @torch.no_grad()
    def generate(self, model: nn.Module, images: Any, prompt: str | None = None, **decoding: Any) -> list[str]:
        """Captions for ``images`` (uint8 (B, H, W, 3) or normalised float (B, 3, H, W)), the
        ``prompt`` text following each image; ``decoding``: dodo.eval.generate.Decoding's fields
        (method greedy | beam | sample, max_tokens, beams, temperature, top_k, top_p, seed...)."""
        from dodo.eval.generate import Decoding, generate_captions

        settings = Decoding(**{"max_tokens": self.cfg.data.max_caption_tokens, **decoding})
        device = next(model.parameters()).device
        pixels = to_model_images(images, self.collate.image_mean, self.collate.image_std).to(device)
        return generate_captions(model, pixels, self.tokenizer, settings, prompt or "")

    # ---------------------------------------------------------------- Task API

    def evaluate(self, model: nn.Module, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
        return {"eval.loss": caption_loss(model, self.eval_set, self.collate, batch_size, rank, world_size)}

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        from dodo.tasks import shapes

        was = model.training
        model.eval()
        samples = [self.eval_set[i] for i in range(min(self.cfg.train.caption_samples, len(self.eval_set)))]
        predicted: list[str] = []
        for lo in range(0, len(samples), 32):
            predicted += self.generate(model, np.stack([s.image for s in samples[lo:lo + 32]]))
        model.train(was)
        if shapes.is_shapes(samples):  # the synthetic captions: score colour and shape
            return shapes.caption_report(samples, predicted)
        lines = [f"greedy captions on {len(samples)} held-out images:"]
        lines += [f"  {s.key}: {p!r:40} (reference: {s.caption!r})" for s, p in zip(samples[:8], predicted)]
        return {}, lines
