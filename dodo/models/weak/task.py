"""The weak family's tasks (tasks layer, found through ``dodo.models.weak.FAMILY.task``).

mae_contrastive: the dual-encoder contrastive task (dodo/tasks/contrastive.py: retrieval on the
  held-out captions, kNN, the eval suites through encode_images / encode_texts) plus the MAE
  reconstruction metric ``eval.mae_mse`` on held-out images (masks from a fixed seed).
reprogram / cross_modal: classification of a labelled dataset by the frozen model; the batches
  carry ``labels``; held-out metric ``eval.reprogram_top1``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from dodo.config.schema import JobConfig
from dodo.data.collate import CaptionCollator
from dodo.models.registry import InitState
from dodo.tasks import Task
from dodo.tasks.contrastive import ContrastiveTask

EVAL_SEED = 1234
EVAL_BATCH = 128


def build_task(cfg: JobConfig, init: InitState | None = None) -> Task:
    if cfg.model.weak.objective == "mae_contrastive":
        return MAEContrastiveTask(cfg, init)
    return ReprogramTask(cfg, init)


class LabelCollator(CaptionCollator):
    """The caption batch plus ``labels`` (B,) long, the samples' class indices."""

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        out = super().__call__(samples)
        out["labels"] = torch.tensor([s.label for s in samples], dtype=torch.long)
        return out


def _batches(ds: Any, size: int):
    for lo in range(0, len(ds), size):
        yield [ds[i] for i in range(lo, min(len(ds), lo + size))]


class MAEContrastiveTask(ContrastiveTask):
    def __init__(self, cfg: JobConfig, init: InitState | None = None):
        super().__init__(cfg, init)
        self.model.attach_texts(self.collate.token_ids)

    @torch.no_grad()
    def encode_images(self, model: nn.Module, images: Any) -> torch.Tensor:
        """The suites' image hook: projected (as the contrastive task) or, with
        model.weak.suite_embedding=backbone, the ViT's [CLS] (DINO's kNN protocol)."""
        if self.cfg.model.weak.suite_embedding == "projected":
            return super().encode_images(model, images)
        from dodo.tasks.encoders import to_model_images
        pixels = to_model_images(images, self.collate.image_mean, self.collate.image_std)
        return model.backbone_embedding(pixels.to(next(model.parameters()).device)).float().cpu()

    @torch.no_grad()
    def mae_mse(self, model: nn.Module) -> float:
        device, total, n = next(model.parameters()).device, 0.0, 0
        gen = torch.Generator().manual_seed(EVAL_SEED)  # the same masks at every evaluation
        for items in _batches(self.eval_set, EVAL_BATCH):
            loss, _ = model.mae(self.collate(items)["images"].to(device), generator=gen)
            total, n = total + float(loss) * len(items), n + len(items)
        return total / max(n, 1)

    def evaluate(self, model: nn.Module, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
        out = super().evaluate(model, batch_size, rank, world_size)
        was = model.training
        model.eval()
        out["eval.mae_mse"] = self.mae_mse(model)
        model.train(was)
        return out

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        metrics, lines = super().final_report(model)
        was = model.training
        model.eval()
        mse = self.mae_mse(model)
        model.train(was)
        return metrics, lines + [f"MAE reconstruction MSE (held-out, masked patches): {mse:.4f}"]


class ReprogramTask(Task):
    """A frozen model reprogrammed for the labelled dataset's classes."""

    def __init__(self, cfg: JobConfig, init: InitState | None = None):
        from dodo.data import build_datasets
        from dodo.data.tokenizer import load_tokenizer
        from dodo.eval.classnames import classnames
        from dodo.tasks import build_family_model

        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        self.model = build_family_model(cfg.model, self.tokenizer, init)
        self.train_set, self.eval_set = build_datasets(cfg.data)
        self.collate = LabelCollator(self.tokenizer, cfg.data.max_caption_tokens)
        names = list(getattr(self.train_set, "classnames", []) or [])
        labels = self._labels(self.train_set)
        if labels.min() < 0:
            raise ValueError(f"data.train_cache={cfg.data.train_cache} has unlabelled samples; reprogramming "
                             "trains a classifier: use a labelled cache")
        self.num_classes = max(len(names), int(labels.max()) + 1)
        source = classnames(cfg.model.weak.reprogram.source_classes)
        self.model.attach_texts(self.collate.token_ids, source, self.num_classes)

    @staticmethod
    def _labels(ds: Any) -> torch.Tensor:
        if hasattr(ds, "labels"):
            return torch.as_tensor(ds.labels())
        return torch.tensor([ds[i].label for i in range(len(ds))])

    # ---------------------------------------------------------------- eval suites (kNN)

    @torch.no_grad()
    def encode_images(self, model: nn.Module, images: Any) -> torch.Tensor:
        """uint8 (B, H, W, 3) or normalised float -> (B, P) unit norm: the reprogrammed input's
        projected [CLS] of the frozen model (reprogram), else the plain image's."""
        from dodo.tasks.encoders import to_model_images
        device = next(model.parameters()).device
        pixels = to_model_images(images, self.collate.image_mean, self.collate.image_std).to(device)
        if model.objective != "reprogram" and pixels.shape[-1] != model.canvas:
            pixels = torch.nn.functional.interpolate(pixels, size=(model.canvas, model.canvas), mode="bilinear",
                                                     antialias=True, align_corners=False)
        return model.encode_image(pixels).float().cpu()

    @torch.no_grad()
    def encode_texts(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        device = next(model.parameters()).device
        ids, mask = self.collate.token_ids(texts)
        return model.encode_text(ids.to(device), mask.to(device)).float().cpu()

    # ---------------------------------------------------------------- Task API

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> tuple[float, float]:
        """(mean cross-entropy, top-1) of the target classes on the held-out set."""
        device = next(model.parameters()).device
        loss, correct, n = 0.0, 0, 0
        for items in _batches(self.eval_set, EVAL_BATCH):
            b = self.collate(items)
            logits = model.target_logits(b["images"].to(device), b["input_ids"].to(device),
                                         b["attention_mask"].to(device))
            y = b["labels"].to(device)
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            n += len(items)
        return loss / max(n, 1), correct / max(n, 1)

    def evaluate(self, model: nn.Module, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
        """Every rank computes the same small metrics; no reduction needed."""
        was = model.training
        model.eval()
        loss, top1 = self.accuracy(model)
        model.train(was)
        return {"eval.loss": loss, "eval.reprogram_top1": top1}

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        m = self.evaluate(model, EVAL_BATCH, 0, 1)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {}, [
            f"{self.cfg.model.weak.objective}: held-out top-1 over {self.num_classes} classes "
            f"{m['eval.reprogram_top1']:.3f} ({trainable} trainable parameters; the model is frozen)"]

    def run_eval(self, model: nn.Module, name: str, out_dir: Any) -> tuple[dict[str, Any], list[str]]:
        """`dodo eval RUN --task accuracy`: the held-out target top-1 of the reprogrammed model."""
        if name != "accuracy":
            raise ValueError(f"unknown eval task {name!r} for a {self.cfg.model.weak.objective} run; choose "
                             "accuracy (kNN and the other suites run through eval.suites)")
        loss, top1 = self.accuracy(model)
        return {"eval.loss": loss, "eval.reprogram_top1": top1}, [f"  eval.reprogram_top1          {top1:.3f}"]
