"""MAGMA's task: image captioning with the prefix LM, scored by held-out loss and captions.

Tasks layer (found through ``dodo.models.magma.FAMILY.task``). For evaluation suites it
exposes ``generate(model, images, prompt=None, **decoding) -> list[str]`` (dodo/eval/generate.py:
greedy, beam, sampling, KV cache) and the prefix embedding + LM through the model
(``model.embed``, ``model.embed_image``, ``model.embed_tokens``, ``model.lm``), as
docs/architecture.md says.
The caption check of the final report is the synthetic shapes suite's (dodo/tasks/shapes.py);
on other data the periodic evaluation scores BLEU-4 / CIDEr-D against all references
(eval.bleu4 / eval.cider) and the report lists a few captions beside a reference.
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
        """Held-out loss; on real captions also BLEU-4 / CIDEr-D of greedy captions of the first
        ``train.caption_samples`` held-out images against all their references (eval.bleu4,
        eval.cider). Every rank decodes the same images (the same number of forwards, which an
        expert-parallel MoE needs) and so computes the same scores."""
        out = {"eval.loss": caption_loss(model, self.eval_set, self.collate, batch_size, rank, world_size)}
        n = self.cfg.train.caption_samples
        if n and len(self.eval_set) and not self._is_shapes():
            from dodo.eval.caption_metrics import run_captioning

            was = model.training
            model.eval()
            try:
                scores = run_captioning(lambda imgs: self.generate(model, np.stack(imgs)), self._first_images(n))
            finally:
                model.train(was)
            out.update({f"eval.{k}": v for k, v in scores.items()})
        return out

    def _is_shapes(self) -> bool:
        from dodo.tasks import shapes

        return shapes.is_shapes([self.eval_set[0]])

    def _first_images(self, n: int) -> Any:
        """The held-out samples (every caption) of its first ``n`` distinct images, found from the
        cache's image ids without decoding any image."""
        from torch.utils.data import Subset

        image_ids = getattr(self.eval_set, "image_ids", None)  # caches: no image decoded
        ids = np.asarray(image_ids() if image_ids is not None else
                         [self.eval_set[i].image_id for i in range(len(self.eval_set))])
        ids = np.where(ids < 0, -1 - np.arange(len(ids)), ids)  # no id: each sample its own image
        first = list(dict.fromkeys(ids.tolist()))[:n]
        return Subset(self.eval_set, np.flatnonzero(np.isin(ids, first)).tolist())

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        from dodo.tasks import shapes

        n = self.cfg.train.caption_samples
        samples = [self.eval_set[i] for i in range(min(n, len(self.eval_set)))]
        real = not shapes.is_shapes(samples)
        if real:  # one line per image (its captions follow each other), its first reference beside it
            first, unique = self._first_images(min(n, 8)), {}
            for i in range(len(first)):
                unique.setdefault(first[i].image_id, first[i])
            samples = list(unique.values())
        was = model.training
        model.eval()
        predicted: list[str] = []
        for lo in range(0, len(samples), 32):
            predicted += self.generate(model, np.stack([s.image for s in samples[lo:lo + 32]]))
        model.train(was)
        if not real:  # the synthetic captions: score colour and shape
            return shapes.caption_report(samples, predicted)
        lines = [f"greedy captions of {len(samples)} held-out images (eval.bleu4 / eval.cider score "
                 f"{n} images against all their references):"]
        lines += [f"  {s.key}: {p!r:40} (a reference: {s.caption!r})" for s, p in zip(samples, predicted)]
        return {}, lines
