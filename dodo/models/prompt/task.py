"""Prompt learning's task (tasks layer, found through ``dodo.models.prompt.FAMILY.task``).

Train: K shots per base class drawn from data.train_cache (dodo/data/fewshot.py, fixed
model.prompt.shot_seed), labels mapped to the base classes' order, cross-entropy over their
prompts' logits. Held-out (data.eval_cache, required): base
(seen) images scored among the base classes, new (unseen) images among the new classes with
their own names (CoCoOp's base-to-new protocol), and their harmonic mean:
``eval.prompt.<dataset>.base_top1 / new_top1 / hm``. The final report adds hand-crafted CLIP
("a photo of a {}.") on the same split, the baseline the prompts must beat. For the zero-shot
suite the task exposes encode_images / encode_texts (texts taken as class names in the prompt).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from dodo.config.schema import JobConfig
from dodo.data import build_datasets
from dodo.data.collate import CaptionCollator
from dodo.data.fewshot import few_shot_indices
from dodo.data.tokenizer import load_tokenizer
from dodo.eval import classnames as cn
from dodo.eval.zeroshot import labelled_images
from dodo.models.prompt.config import base_split
from dodo.models.prompt.model import PromptCLIP
from dodo.models.registry import InitState
from dodo.tasks import Task
from dodo.tasks.encoders import image_features, to_model_images

HANDCRAFTED = "a photo of a {}."  # CLIP's plain template: the baseline of CoOp's tables


class LabelCollator:
    """Samples -> {"images": (B, 3, H, W) uint8 (the device normalises them), "labels": (B,)
    long, the sample's class mapped to its index among the trained classes}. Picklable."""

    def __init__(self, class_map: dict[int, int], image_mean: Sequence[float] = (0.5,) * 3,
                 image_std: Sequence[float] = (0.5,) * 3):
        self.class_map, self.image_mean, self.image_std = dict(class_map), tuple(image_mean), tuple(image_std)

    def __call__(self, samples: list) -> dict[str, Any]:
        pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)  # (B, 3, H, W)
        labels = torch.tensor([self.class_map[s.label] for s in samples], dtype=torch.long)
        return {"images": pixels, "labels": labels}


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


class PromptTask(Task):
    def __init__(self, cfg: JobConfig, init: InitState | None = None):
        self.cfg = cfg
        p = cfg.model.prompt
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        train, evals = build_datasets(cfg.data)
        self.names = cn.classnames(p.classnames, train.classnames)
        self.base, self.new = base_split(len(self.names), p.base_classes, p.base_to_new)
        shots = few_shot_indices(train.labels(), train.image_ids(), p.shots, p.shot_seed, self.base)
        self.train_set, self.eval_set = Subset(train, shots.tolist()), evals
        self.model = PromptCLIP(cfg.model, self.tokenizer, [self.names[c] for c in self.base])
        self.collate = LabelCollator({c: k for k, c in enumerate(self.base)})
        manifest = getattr(evals, "manifest", None)
        self.dataset = (getattr(manifest, "dataset", "") or "heldout").replace("-", "_")
        self._eval_cache: tuple[list, torch.Tensor] | None = None
        self.text_collate = CaptionCollator(self.tokenizer, cfg.model.clip.max_text_len)

    # ---------------------------------------------------------------- eval-suite hooks

    @torch.no_grad()
    def encode_images(self, model: nn.Module, images: Any) -> torch.Tensor:
        return image_features(model, images, self.collate)

    @torch.no_grad()
    def encode_texts(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        return model.encode_text(texts).float().cpu()

    # ---------------------------------------------------------------- base-to-new scoring

    def _heldout(self) -> tuple[list, torch.Tensor]:
        if self._eval_cache is None:
            self._eval_cache = labelled_images(self.eval_set)
        return self._eval_cache

    @torch.no_grad()
    def _scores(self, logits_fn, batch_size: int, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """``logits_fn(images (B, 3, H, W), names, classes) -> (B, len(names))``; top-1 on the
        base and new images, each among its own classes; eval.loss on the base images. Rank r
        scores every world_size-th image and the counts are summed over ranks (all ranks call)."""
        images, labels = self._heldout()
        out: dict[str, float] = {}
        tag = f"eval.prompt.{self.dataset}"
        for split, classes in (("base", self.base), ("new", self.new)):
            keep = [i for i, y in enumerate(labels.tolist()) if y in set(classes)]
            if not classes or not keep:
                continue
            index = {c: k for k, c in enumerate(classes)}
            trained = {c: k for k, c in enumerate(self.base)}
            names = [self.names[c] for c in classes]
            mine = keep[rank::world_size]
            hits, loss = 0.0, 0.0
            for lo in range(0, len(mine), batch_size):
                rows = mine[lo:lo + batch_size]
                pix = to_model_images([images[i] for i in rows], self.collate.image_mean, self.collate.image_std)
                y = torch.tensor([index[int(labels[i])] for i in rows])
                logits = logits_fn(pix, names, [trained.get(c) for c in classes]).float().cpu()
                hits += float((logits.argmax(1) == y).sum())
                loss += float(F.cross_entropy(logits, y, reduction="sum"))
            if world_size > 1:  # sum (hits, loss) over ranks, on the process group's device
                import torch.distributed as dist

                device = next(self.model.parameters()).device
                both = torch.tensor([hits, loss], dtype=torch.float64, device=device)
                dist.all_reduce(both)
                hits, loss = both.tolist()
            out[f"{tag}.{split}_top1"] = hits / len(keep)
            if split == "base":
                out["eval.loss"] = loss / len(keep)
        if f"{tag}.new_top1" in out:
            out[f"{tag}.hm"] = harmonic_mean(out[f"{tag}.base_top1"], out[f"{tag}.new_top1"])
        return out

    def evaluate(self, model: nn.Module, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
        """The held-out images are split over the ranks; every rank gets the summed metrics."""
        was = model.training
        model.eval()
        device = next(model.parameters()).device

        def learned(pix, names, classes):
            return model.logits(pix.to(device), model.name_ids(names), classes)
        try:
            return self._scores(learned, max(1, batch_size), rank, world_size)
        finally:
            model.train(was)

    def handcrafted(self, model: nn.Module) -> dict[str, float]:
        """The frozen CLIP with the prompt "a photo of a {}." on the same split (the baseline)."""
        device = next(model.parameters()).device
        clip = model.clip

        def fixed(pix, names, classes):
            ids, mask = self.text_collate.token_ids([HANDCRAFTED.format(n) for n in names])
            txt = clip.get_text_features(input_ids=ids.to(device), attention_mask=mask.to(device))
            txt = F.normalize(txt if torch.is_tensor(txt) else txt.pooler_output, dim=-1)
            return clip.logit_scale.exp() * model.encode_image(pix.to(device)) @ txt.T
        was = model.training
        model.eval()
        try:
            scores = self._scores(fixed, 64)
        finally:
            model.train(was)
        return {k.replace("eval.prompt.", "eval.prompt_handcrafted."): v for k, v in scores.items() if k != "eval.loss"}

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        """The hand-crafted baseline (the learned prompts' scores are the final eval's)."""
        p = self.cfg.model.prompt
        metrics = self.handcrafted(model)  # rank 0 alone: the frozen CLIP's scores
        head = (f"prompt learning ({p.method}{', csc' if p.method == 'coop' and p.csc else ''}): {p.shots} shots x "
                f"{len(self.base)} base classes ({len(self.train_set)} images), {len(self.new)} new classes; "
                "hand-crafted prompt:")
        return metrics, [head] + [f"  {k:52} {v:.4f}" for k, v in metrics.items()]


def build_task(cfg: JobConfig, init: InitState | None = None) -> Task:
    return PromptTask(cfg, init)
